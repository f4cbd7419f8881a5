"""Methods from outside cilbench: ``--plugin FILE.py`` files and the ``cilbench.methods`` entry-point group.

A plugin file is an ordinary Python file whose ``@register_method("name", ...)`` classes join the registry when it
is imported; a pip-installed package declares its methods as entry points (name = method name, value =
``"module:Class"``), registered by name and imported only when the method is used, so ``cilbench --help`` stays
fast. Both run on the same loop as the built-in methods.

Code runs only where the user asked for it: a file named with ``--plugin`` or ``$CILBENCH_PLUGINS`` (os.pathsep-
separated), or a package the user installed. Nothing cilbench reads on its own (results, the cache, suites, the
user dataset catalog, which is JSON) is ever imported. A plugin file is imported alone: its folder is not put on
``sys.path`` (helpers it needs belong in an installed package).

A name taken by a built-in method is refused in one line: a published method is never replaced. Every method keeps
its origin (``method_origin``): built-in, ``entry point <dist> <version>`` or ``plugin <path> sha256 <hex>``, which
run records carry so a number can always be traced to the code that made it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from cilbench.errors import CilbenchError

GROUP = "cilbench.methods"
ENV_VAR = "CILBENCH_PLUGINS"
# record file names join fields with "__": a method name never holds it; letters, digits, '-', '_' and '.'
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]|_(?!_)){0,63}")

_origins: dict[str, dict[str, Any]] = {}  # external method -> its origin (built-ins are not listed here)
_entry_points: dict[str, metadata.EntryPoint] = {}  # method -> its entry point, until first use
_problems: dict[str, str] = {}  # entry point name -> why it was refused (one line)
_loaded_files: dict[Path, str] = {}  # resolved plugin path -> sha256 of the content imported
_pending: list[Path] = []  # --plugin files to import before the next method is resolved
_env_done: str | None = None  # the $CILBENCH_PLUGINS value whose files are imported


# ---------------------------------------------------------------- origins

def _builtin() -> frozenset[str]:
    from cilbench.methods import BUILTIN_METHODS

    return BUILTIN_METHODS


def is_external(name: str) -> bool:
    """Whether ``name`` is a method from outside cilbench (entry point, plugin file or any other module)."""
    return name not in _builtin()


def method_origin(name: str) -> dict[str, Any]:
    """Where method ``name`` comes from, for run records and ``methods list``:

    * ``{"kind": "built-in", "package": "cilbench", "version": ...}``
    * ``{"kind": "entry point", "package": DIST, "version": ..., "target": "module:Class"}``
    * ``{"kind": "plugin", "path": ABSOLUTE_PATH, "sha256": HEX}``
    * ``{"kind": "module", "module": NAME}`` for a class registered by code that imported cilbench itself

    each with ``text``, the origin in one line (``plugin /x/my_method.py sha256 ab12...``)."""
    from cilbench.methods.base import METHODS

    if name in _origins:
        return dict(_origins[name])
    entry = METHODS.entry(name)  # unknown names: one line with "did you mean"
    if name in _builtin():
        version = _version("cilbench")
        return {"kind": "built-in", "package": "cilbench", "version": version, "text": "built-in"}
    module = entry.target.partition(":")[0] if isinstance(entry.target, str) else \
        getattr(entry.target, "__module__", "?")
    return {"kind": "module", "module": module, "text": f"module {module}"}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _check_name(name: str, where: str) -> None:
    if not _NAME.fullmatch(name):
        raise CilbenchError(f"{where}: method name {name[:70]!r} is not allowed; use 1 to 64 ASCII letters, digits, "
                            f"'-', '.' or '_' (never '__'), starting with a letter or digit")


def _taken_by(name: str) -> str:
    """Who holds ``name`` already, in words."""
    if name in _builtin():
        return f"the built-in method {name!r}"
    if name in _origins:
        return f"{name!r} from {_origins[name]['text']}"
    return f"the method {name!r}"


# ---------------------------------------------------------------- entry points

def register_entry_points() -> None:
    """Register (by name, without importing) the methods of the ``cilbench.methods`` entry-point group. Names of
    built-in or already registered methods are refused (``entry_point_problems``); safe to call again (a package
    installed since is picked up)."""
    from cilbench.methods.base import METHODS

    try:
        found = metadata.entry_points(group=GROUP)
    except Exception as err:  # noqa: BLE001 - broken metadata of some unrelated package must not stop cilbench
        _problems["*"] = f"cannot read the {GROUP} entry points: {type(err).__name__}: {err}"
        return
    for ep in sorted(found, key=lambda e: (e.name, e.value)):
        if ep.name in _entry_points and _entry_points[ep.name].value == ep.value:
            continue
        dist = getattr(ep, "dist", None)
        package, version = (dist.name, dist.version) if dist is not None else ("?", None)
        where = f"entry point {ep.name} = {ep.value} of {package} {version or ''}".rstrip()
        try:
            _check_name(ep.name, where)
        except CilbenchError as err:
            _problems[ep.name] = str(err)
            continue
        if ep.name in METHODS:
            _problems[ep.name] = (f"{where} is refused: the name is taken by {_taken_by(ep.name)}; rename the "
                                  f"entry point")
            continue
        METHODS.register(ep.name, ep.value)
        _entry_points[ep.name] = ep
        _origins[ep.name] = {"kind": "entry point", "package": package, "version": version, "target": ep.value,
                             "text": f"entry point {package} {version or ''}".rstrip()}


def entry_point_problems() -> list[str]:
    """One line per entry point that was refused (a built-in's name, a bad name, unreadable metadata)."""
    return [_problems[k] for k in sorted(_problems)]


def _load_entry_point(name: str) -> type:
    """Import the class of entry point ``name`` on first use; every failure is one line naming the package."""
    from cilbench.methods.base import METHODS

    ep, origin = _entry_points[name], _origins[name]
    where = f"method {name} ({origin['text']}, {ep.value})"

    def restore() -> None:  # back to the lazy entry: the next use tries again and fails the same way
        METHODS.remove(name)
        METHODS.register(name, ep.value)

    # the module's own @register_method(name) may register the name while it is imported; anything else is an error
    METHODS.remove(name)
    try:
        obj = ep.load()
    except Exception as err:  # noqa: BLE001 - the package's import error, shown in one line
        restore()
        raise CilbenchError(f"{where} cannot be loaded: {_describe(err, None)}; fix or uninstall "
                            f"{origin['package']}") from None
    if name not in METHODS:
        METHODS.register(name, obj)
    elif METHODS.entry(name).target is not obj:
        other = METHODS.entry(name).target
        restore()
        raise CilbenchError(f"{where}: importing it registered another class ({getattr(other, '__qualname__', other)}"
                            f") under the name {name!r}")
    try:
        _check_method_class(obj, name, where)
    except CilbenchError:
        restore()
        raise
    return obj


def _check_method_class(obj: Any, name: str, where: str) -> None:
    from cilbench.methods.base import Method

    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise CilbenchError(f"{where} is {type(obj).__name__} {getattr(obj, '__qualname__', obj)!r}, not a subclass "
                            f"of cilbench.methods.base.Method")
    own = obj.__dict__.get("name")
    if own is None:  # an undecorated class: it carries the name it is registered under (not its parent's)
        obj.name = name  # type: ignore[attr-defined]
    elif own != name:
        raise CilbenchError(f"{where}: the class is registered as {own!r}, not {name!r}; use one name")


# ---------------------------------------------------------------- loading

def load_method(name: str) -> type:
    """The class of method ``name``: built-in, from a plugin file, or imported from its entry point on first use."""
    from cilbench.methods.base import METHODS

    load_requested()
    if name not in METHODS:
        register_entry_points()  # a package installed since this process started
    if name not in METHODS and name in _problems:
        raise CilbenchError(_problems[name])
    try:
        entry = METHODS.entry(name)  # unknown names: one line with "did you mean"
    except CilbenchError as err:
        raise CilbenchError(f"{err}; a method of your own: name its file with --plugin FILE.py (or "
                            f"${ENV_VAR}), or install its package") from None
    if isinstance(entry.target, str) and name in _entry_points:
        return _load_entry_point(name)
    return entry.load()


def env_plugin_files() -> list[Path]:
    """The files named in ``$CILBENCH_PLUGINS`` (os.pathsep-separated; empty parts ignored)."""
    return [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]


def load_plugins(files: Iterable[str | Path]) -> list[str]:
    """Import each plugin file once (again when its content changed) and return the methods they registered.

    A missing file, a syntax error, an exception while importing, a method name taken by a built-in or another
    method, or a registered class that is not a ``Method`` ends in one ``CilbenchError`` line naming the file."""
    names: list[str] = []
    for file in files:
        names += _load_file(Path(file))
    return names


def _check_file(file: Path) -> Path:
    shown, path = str(file), file.expanduser()
    if not path.exists():
        raise CilbenchError(f"plugin {shown}: no such file")
    if not path.is_file():
        raise CilbenchError(f"plugin {shown}: not a file; name a Python file (my_method.py)")
    if path.suffix != ".py":
        raise CilbenchError(f"plugin {shown}: not a .py file; name a Python file (my_method.py)")
    return path


def _load_file(file: Path) -> list[str]:
    from cilbench.methods.base import METHODS
    from cilbench.registry import DuplicateName

    shown = str(file)
    path = _check_file(file)
    try:
        source = path.read_bytes()
    except OSError as err:
        raise CilbenchError(f"plugin {shown}: cannot be read ({err.strerror or err})") from None
    resolved = path.resolve()
    sha = hashlib.sha256(source).hexdigest()
    if _loaded_files.get(resolved) == sha:
        return [n for n, o in _origins.items() if o.get("path") == str(resolved)]
    for old in [n for n, o in _origins.items() if o.get("path") == str(resolved)]:  # the file changed: replace
        METHODS.remove(old)
        del _origins[old]
    stem = re.sub(r"\W", "_", resolved.stem)
    module_name = f"cilbench_plugin_{stem}_{sha[:12]}"  # unique: two files called method.py never collide
    before = {n: METHODS.entry(n).target for n in METHODS.names()}
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise CilbenchError(f"plugin {shown}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and typing.get_type_hints look the module up here

    def undo() -> None:
        sys.modules.pop(module_name, None)
        for n in METHODS.names():
            if n not in before:
                METHODS.remove(n)

    try:
        spec.loader.exec_module(module)
    except DuplicateName as err:
        undo()
        raise CilbenchError(f"plugin {shown}: method name {err.name!r} is refused, it is taken by "
                            f"{_taken_by(err.name)}; pick another name") from None
    except SyntaxError as err:
        undo()
        raise CilbenchError(f"plugin {shown}: syntax error at line {err.lineno}: {err.msg}") from None
    except (Exception, SystemExit) as err:  # noqa: BLE001 - whatever the plugin raises is one line
        undo()
        raise CilbenchError(f"plugin {shown} failed while being imported: {_describe(err, resolved)}") from None
    new = [n for n in METHODS.names() if n not in before]
    try:
        for n in new:
            where = f"plugin {shown}"
            _check_name(n, where)
            _check_method_class(METHODS.entry(n).target, n, f"{where}: method {n}")
    except CilbenchError:
        undo()
        raise
    for n in new:
        _origins[n] = {"kind": "plugin", "path": str(resolved), "sha256": sha,
                       "text": f"plugin {resolved} sha256 {sha}"}
    _loaded_files[resolved] = sha
    return new


def _describe(err: BaseException, file: Path | None) -> str:
    """``ZeroDivisionError: division by zero (line 7)``: the exception and, for a plugin file, the line of the
    file where it was raised (the deepest frame in that file)."""
    text = " ".join(str(err).split()) or "(no message)"
    where = ""
    if file is not None:
        lines = [f.lineno for f in traceback.extract_tb(err.__traceback__) if Path(f.filename) == file]
        where = f" (line {lines[-1]})" if lines else ""
    return f"{type(err).__name__}: {text[:300]}{where}"


def request(files: Iterable[str | Path]) -> None:
    """``--plugin``: the files to import before the next method is resolved, with those of ``$CILBENCH_PLUGINS``.
    They are checked now (a missing file is one line before any work) and imported on first use, so a command that
    never resolves a method (``table`` without ``--benchmark``) imports nothing."""
    global _pending
    files = [Path(f) for f in files]
    for file in [*files, *env_plugin_files()]:
        _check_file(file)
    _pending = files


def clear_requests() -> None:
    """Forget the files an earlier command asked for (tests run many commands in one process)."""
    global _pending
    _pending = []


def load_requested() -> None:
    """Import the requested plugin files and those of ``$CILBENCH_PLUGINS`` not imported yet."""
    global _pending, _env_done
    env = os.environ.get(ENV_VAR, "")
    files = [*_pending, *(env_plugin_files() if env != _env_done else [])]
    if files:
        load_plugins(files)
    _pending, _env_done = [], env
