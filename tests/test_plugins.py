"""Methods from outside cilbench: ``--plugin FILE.py``, ``$CILBENCH_PLUGINS`` and the ``cilbench.methods``
entry-point group (a fake installed distribution on sys.path)."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
from _one_line import cli_error

from cilbench import plugins
from cilbench.errors import CilbenchError
from cilbench.methods import BUILTIN_METHODS, load_method
from cilbench.methods.base import METHODS

README = Path(__file__).resolve().parents[1] / "README.md"

PLUGIN = '''
import torch

from cilbench.methods.base import register_method
from cilbench.methods.simplecil import SimpleCIL


@register_method("{name}", paper="test plugin", family="ptm-cil", backbone="vit-b16-in21k", backbone_family="vit",
                 summary="nearest class mean by Euclidean distance")
class EuclideanNCM(SimpleCIL):
    def logits(self, images, classes):
        return -torch.cdist(self.backbone(images).float(), self.head.prototypes[classes].float())
'''


@pytest.fixture(autouse=True)
def _restore_registry(monkeypatch):
    """Each test starts from the built-in methods; what a test registers is gone afterwards."""
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))
    for state in ("_origins", "_entry_points", "_problems", "_loaded_files"):
        monkeypatch.setattr(plugins, state, dict(getattr(plugins, state)))
    monkeypatch.setattr(plugins, "_pending", [])
    monkeypatch.setattr(plugins, "_env_done", None)
    monkeypatch.delenv(plugins.ENV_VAR, raising=False)
    modules = set(sys.modules)
    yield
    for name in set(sys.modules) - modules:
        if name.startswith(("cilbench_plugin_", "fakepkg")):
            del sys.modules[name]


def _plugin(tmp_path: Path, name: str = "mymethod", file: str = "my_method.py") -> Path:
    path = tmp_path / file
    path.write_text(PLUGIN.format(name=name))
    return path


_one_line = partial(cli_error, code=2)


# ---------------------------------------------------------------- plugin files

def test_plugin_file_is_listed_as_external_with_its_origin(cli, tmp_path):
    path = _plugin(tmp_path)
    r = cli("methods", "list", "--json", "--plugin", path)
    assert r.code == 0, r.err
    items = {i["name"]: i for i in json.loads(r.out)}
    assert items["mymethod"]["origin"] == "external" and items["simplecil"]["origin"] == "built-in"
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert items["mymethod"]["origin_detail"] == {"kind": "plugin", "path": str(path.resolve()), "sha256": sha,
                                                  "text": f"plugin {path.resolve()} sha256 {sha}"}
    piped = cli("methods", "list", "--plugin", path).out.splitlines()
    assert any(line.startswith("| mymethod |") and "| external |" in line for line in piped)
    assert any(line.startswith("| simplecil |") and "| built-in |" in line for line in piped)


def test_method_origin_of_each_kind(tmp_path):
    assert plugins.method_origin("simplecil")["kind"] == "built-in"
    assert plugins.method_origin("simplecil")["text"] == "built-in"
    path = _plugin(tmp_path)
    assert plugins.load_plugins([path]) == ["mymethod"]
    origin = plugins.method_origin("mymethod")
    assert origin["kind"] == "plugin" and origin["path"] == str(path.resolve())
    assert origin["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert plugins.is_external("mymethod") and not plugins.is_external("simplecil")
    with pytest.raises(CilbenchError, match="unknown method 'nomethod'.*--plugin FILE.py"):
        load_method("nomethod")
    with pytest.raises(CilbenchError, match="unknown method 'nomethod'"):
        plugins.method_origin("nomethod")


def test_plugin_method_runs_quick_on_digits_on_the_same_loop(cli, tmp_path):
    path = _plugin(tmp_path)
    r = cli("run", "mymethod", "--plugin", path, "--dataset", "digits", "--quick", "--out", tmp_path / "res")
    assert r.code == 0, r.err
    record = json.loads(next((tmp_path / "res").glob("mymethod__digits__*.json")).read_text())
    assert record["method"] == "mymethod" and record["increments"] == [2] * 5
    assert record["metrics"]["A_last"] > 20  # ten digit classes, nearest class mean: above chance
    # the record says where the method came from
    assert record["method_origin"]["kind"] == "plugin"
    assert record["method_origin"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # an edited plugin is another method version: its record is not silently overwritten
    path.write_text(path.read_text() + "\n# edited\n")
    r = cli("run", "mymethod", "--plugin", path, "--dataset", "digits", "--quick", "--out", tmp_path / "res")
    assert r.code != 0 and "plugin version" in r.err


def test_plugins_from_the_environment_variable(cli, tmp_path, monkeypatch):
    path = _plugin(tmp_path, "envmethod")
    monkeypatch.setenv(plugins.ENV_VAR, f"{path}{__import__('os').pathsep}")
    r = cli("methods", "info", "envmethod", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["origin"]["kind"] == "plugin"


def test_loading_the_same_file_twice_is_harmless_and_a_changed_file_replaces_its_methods(tmp_path):
    path = _plugin(tmp_path)
    assert plugins.load_plugins([path, path]) == ["mymethod", "mymethod"]
    first = load_method("mymethod")
    path.write_text(PLUGIN.format(name="mymethod") + "\n# edited\n")
    plugins.load_plugins([path])
    assert load_method("mymethod") is not first
    assert plugins.method_origin("mymethod")["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case, content, expected", [
    ("missing", None, r"^error: plugin \S+nope\.py: no such file$"),
    ("syntax", "def broken(:\n", r"^error: plugin \S+bad\.py: syntax error at line 1: "),
    ("raises", "import math\nraise RuntimeError('no licence key')\n",
     r"^error: plugin \S+bad\.py failed while being imported: RuntimeError: no licence key \(line 2\)$"),
    ("missing import", "import not_a_module_anywhere\n",
     r"^error: plugin \S+bad\.py failed while being imported: ModuleNotFoundError: .*not_a_module_anywhere"),
    ("exits", "import sys\nsys.exit(3)\n", r"^error: plugin \S+bad\.py failed while being imported: SystemExit"),
    ("collision", PLUGIN.format(name="simplecil"),
     r"^error: plugin \S+bad\.py: method name 'simplecil' is refused, it is taken by the built-in method "
     r"'simplecil'; pick another name$"),
    ("not a method", "from cilbench.methods.base import register_method\n"
                     "register_method('thing')(type('Thing', (), {}))\n",
     r"^error: plugin \S+bad\.py: method thing is type 'Thing', not a subclass of cilbench.methods.base.Method$"),
    ("bad name", PLUGIN.format(name="my__method"), r"^error: plugin \S+bad\.py: method name 'my__method' is not "),
])
def test_plugin_errors_are_one_line_naming_the_file(cli, tmp_path, case, content, expected):
    file = tmp_path / ("nope.py" if content is None else "bad.py")
    if content is not None:
        file.write_text(content)
    r = cli("run", "simplecil", "--plugin", file, "--dataset", "digits", "--quick", "--out", tmp_path / "res")
    assert re.search(expected, _one_line(r)), r.err
    assert not (tmp_path / "res").exists()  # nothing ran
    assert set(METHODS.names()) == set(BUILTIN_METHODS)  # a failed plugin leaves nothing registered
    assert METHODS.metadata("simplecil").get("paper", "").startswith("Zhou")  # the built-in is still there


def test_a_plugin_never_replaces_a_builtin_even_before_the_builtin_is_imported(tmp_path, monkeypatch):
    from cilbench.registry import Entry

    # a fresh lazy entry, as in a process that has not imported cilbench.methods.ranpac yet
    monkeypatch.setitem(METHODS._entries, "ranpac", Entry("ranpac", "cilbench.methods.ranpac:RanPAC"))
    with pytest.raises(CilbenchError, match="'ranpac' is refused, it is taken by the built-in method"):
        plugins.load_plugins([_plugin(tmp_path, "ranpac")])
    assert load_method("ranpac").__module__ == "cilbench.methods.ranpac"


def test_two_plugins_cannot_share_a_name(tmp_path):
    plugins.load_plugins([_plugin(tmp_path, "mine", "a.py")])
    with pytest.raises(CilbenchError, match=r"b\.py: method name 'mine' is refused, it is taken by 'mine' from "
                                            r"plugin \S+a\.py sha256"):
        plugins.load_plugins([_plugin(tmp_path, "mine", "b.py")])


def test_plugin_option_is_on_every_command_that_resolves_methods(cli):
    for command in (["run"], ["bench"], ["sweep"], ["table"], ["methods", "list"], ["methods", "info"]):
        r = cli(*command, "--help")
        assert r.code == 0 and "--plugin" in r.out, command


def test_a_command_that_resolves_no_method_imports_no_plugin(cli, tmp_path):
    """`table` without --benchmark never resolves a method: a --plugin file is checked, not imported."""
    marker = tmp_path / "imported"
    path = tmp_path / "p.py"
    path.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    r = cli("table", "--results", tmp_path / "none", "--plugin", path)
    assert not marker.exists(), r.err
    assert "no such file" in _one_line(cli("table", "--results", tmp_path, "--plugin", tmp_path / "gone.py"))
    assert cli("methods", "list", "--plugin", path).code == 0 and marker.exists()  # methods list resolves them


def test_nothing_in_a_results_or_cache_folder_is_imported(cli, tmp_path, monkeypatch):
    """Code runs only when named: a .py file lying in the folders cilbench reads is never imported."""
    marker = tmp_path / "ran"
    for folder in (tmp_path / "res", tmp_path / "cache"):
        folder.mkdir()
        (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    monkeypatch.setenv("CILBENCH_CACHE", str(tmp_path / "cache"))
    assert cli("run", "simplecil", "--dataset", "digits", "--quick", "--out", tmp_path / "res").code == 0
    assert cli("table", "--results", tmp_path / "res").code == 0
    assert cli("datasets", "list").code == 0 and cli("methods", "list").code == 0
    assert not marker.exists()


# ---------------------------------------------------------------- entry points

def _fake_distribution(root: Path, entry_points: str) -> None:
    """An installed distribution ``fakepkg-cil 1.2`` as pip leaves it: the package and its ``.dist-info``."""
    (root / "fakepkg").mkdir(parents=True)
    (root / "fakepkg" / "__init__.py").write_text(textwrap.dedent('''
        from cilbench.methods.base import register_method
        from cilbench.methods.simplecil import SimpleCIL


        @register_method("epmethod", paper="from a package", family="ptm-cil", backbone="vit-b16-in21k",
                         backbone_family="vit", summary="SimpleCIL, installed")
        class EPMethod(SimpleCIL):
            pass


        class Undecorated(SimpleCIL):
            """A class the package does not decorate: the entry point's name is its name."""
    '''))
    info = root / "fakepkg_cil-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakepkg-cil\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def installed(tmp_path, monkeypatch):
    _fake_distribution(tmp_path / "site", textwrap.dedent('''
        [cilbench.methods]
        epmethod = fakepkg:EPMethod
        plain = fakepkg:Undecorated
        simplecil = fakepkg:EPMethod
        broken = fakepkg_missing_module:Thing
    '''))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    plugins.register_entry_points()


def test_entry_points_are_registered_lazily_and_run(installed, cli, tmp_path):
    assert "epmethod" in METHODS and "fakepkg" not in sys.modules  # registered by name, not imported
    cls = load_method("epmethod")
    assert cls.__module__ == "fakepkg" and METHODS.metadata("epmethod")["paper"] == "from a package"
    assert plugins.method_origin("epmethod") == {"kind": "entry point", "package": "fakepkg-cil", "version": "1.2",
                                                 "target": "fakepkg:EPMethod", "text": "entry point fakepkg-cil 1.2"}
    assert load_method("plain").name == "plain"  # an undecorated class takes the entry point's name
    r = cli("run", "epmethod", "--dataset", "digits", "--quick", "--out", tmp_path / "res")
    assert r.code == 0, r.err
    assert json.loads(next((tmp_path / "res").glob("epmethod__*.json")).read_text())["method"] == "epmethod"


def test_entry_point_with_a_builtin_name_is_refused_and_broken_one_warned(installed, cli):
    assert load_method("simplecil").__module__ == "cilbench.methods.simplecil"  # never replaced
    r = cli("methods", "list", "--json")
    assert r.code == 0, r.err
    items = {i["name"]: i for i in json.loads(r.out)}
    assert items["epmethod"]["origin"] == "external" and items["simplecil"]["origin"] == "built-in"
    assert "broken" not in items
    warnings = [line for line in r.err.splitlines() if line.strip()]
    assert len(warnings) == 2, r.err
    assert any(re.fullmatch(r"warning: entry point simplecil = fakepkg:EPMethod of fakepkg-cil 1\.2 is refused: the "
                            r"name is taken by the built-in method 'simplecil'; rename the entry point", w)
               for w in warnings), warnings
    assert any(w.startswith("warning: method broken (entry point fakepkg-cil 1.2, fakepkg_missing_module:Thing) "
                            "cannot be loaded: ModuleNotFoundError") for w in warnings), warnings


def test_broken_entry_point_is_one_line_when_used(installed, cli, tmp_path):
    r = cli("run", "broken", "--dataset", "digits", "--quick", "--out", tmp_path / "res")
    line = _one_line(r)
    assert line.startswith("error: method broken (entry point fakepkg-cil 1.2, fakepkg_missing_module:Thing) "
                           "cannot be loaded: ModuleNotFoundError") and "uninstall fakepkg-cil" in line


def test_a_plugin_file_cannot_take_an_entry_point_name(installed, tmp_path):
    with pytest.raises(CilbenchError, match="'epmethod' is refused, it is taken by 'epmethod' from entry point "
                                            "fakepkg-cil 1.2"):
        plugins.load_plugins([_plugin(tmp_path, "epmethod")])


# ---------------------------------------------------------------- the README shows what works

def _readme_section() -> str:
    text = README.read_text()
    start = text.index("## Your own method and your own data")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_plugin_runs_as_shown(cli, tmp_path, monkeypatch):
    section = _readme_section()
    source = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "register_method" in source
    monkeypatch.chdir(tmp_path)
    Path("my_method.py").write_text(source)
    command = re.search(r"^cilbench run (\S+) --plugin my_method\.py (.*)$", section, re.M)
    assert command, "the README runs its plugin with cilbench run NAME --plugin my_method.py ..."
    r = cli("run", command.group(1), "--plugin", "my_method.py", *command.group(2).split(), "--out", tmp_path / "res")
    assert r.code == 0, r.err
    assert json.loads(next((tmp_path / "res").glob("*.json")).read_text())["method"] == command.group(1)
