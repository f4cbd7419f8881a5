"""Thin Typer commands: parse, call the API, print with rich. Every user error is one line and a non-zero exit."""

from __future__ import annotations

import io
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cilbench.errors import CilbenchError



class _PipeSafe(io.TextIOBase):
    """stdout that survives a closed pipe (``cilbench run ... | head``): once the reader is gone, output is dropped
    and the run goes on to write its record. Resolves ``sys.stdout`` at each write (tests swap it)."""

    def __init__(self) -> None:
        self.gone = False

    @property
    def _stream(self):
        return sys.stdout

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                self._stream.write(text)
            except BrokenPipeError:
                self._closed()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._closed()

    def _closed(self) -> None:
        self.gone = True
        try:  # point the descriptor at /dev/null so the interpreter's own flush at exit stays quiet too
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass

    def isatty(self) -> bool:
        try:
            return self._stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8") or "utf-8"


console = Console(file=_PipeSafe())
err_console = Console(stderr=True)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="rich",
                  help="Continual-learning benchmarks for pre-trained vision and vision-language models.\n\n"
                       "Example: [bold]cilbench run simplecil --dataset digits --quick[/], then [bold]cilbench "
                       "table[/] (our runs beside the papers' numbers)")
methods_app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich",
                          help="Registered methods and their hyperparameters.\n\n"
                               "Example: [bold]cilbench methods list[/]  or  [bold]cilbench methods info ease[/]")
datasets_app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich",
                           help="The dataset catalog: list, inspect, prepare, split.\n\n"
                                "Example: [bold]cilbench datasets list[/]  or  [bold]cilbench datasets prepare "
                                "cifar100[/]")
app.add_typer(methods_app, name="methods")
app.add_typer(datasets_app, name="datasets")


@app.callback()
def _every_command() -> None:
    """Before any command: state of an earlier command in this process (tests run many) is forgotten."""
    from cilbench.data.user_catalog import use_cache
    from cilbench.plugins import clear_requests

    use_cache(None)  # the user dataset catalog follows each command's own --cache-dir
    clear_requests()  # and the plugin files are each command's own


def _use_plugins(files: list[Path]) -> list[Path]:
    """--plugin: the named files and those of $CILBENCH_PLUGINS, checked now, imported when a method is resolved."""
    from cilbench.plugins import request

    request(files or [])
    return files


def _plugin_option() -> Any:
    """``--plugin FILE.py`` (repeatable) of every command that resolves methods."""
    return typer.Option([], "--plugin", metavar="FILE.py", callback=_use_plugins,
                        help="A Python file registering your own methods (repeatable; also $CILBENCH_PLUGINS, "
                             "os.pathsep-separated).")


def _user_catalog(cache_dir: Optional[Path]) -> None:
    """Read the user dataset catalog of this command's cache folder (``--cache-dir``, else $CILBENCH_CACHE)."""
    from cilbench.data.user_catalog import use_cache

    use_cache(cache_dir)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# ---------------------------------------------------------------- methods
@methods_app.command("list")
def methods_list(as_json: bool = typer.Option(False, "--json", help="Print JSON."),
                 plugin: list[Path] = _plugin_option()) -> None:
    """List registered methods: family, default backbone, origin (built-in, or external: an installed package's
    entry point or a --plugin file; --json says which), paper and what each does.

    Piped or redirected, the list is a markdown table with one line per method (names never wrap, so
    [bold]cilbench methods list | grep -w ease[/] finds a method).

    Example: [bold]cilbench methods list[/]  or  [bold]cilbench methods list --json[/]
    """
    from cilbench.methods import METHODS, load_all
    from cilbench.plugins import entry_point_problems, is_external, method_origin

    for line in entry_point_problems():  # refused entry points (a built-in's name): one line each
        _warn_skipped(line)
    names = load_all(on_error=_warn_skipped)  # an external method that cannot be imported: one line, left out
    items = [{"name": name, "family": m.get("family", ""), "default_backbone": m.get("backbone", ""),
              "origin": "external" if is_external(name) else "built-in",
              "paper": m.get("paper", ""), "summary": m.get("summary", "")}
             for name, m in ((n, METHODS.metadata(n)) for n in names)]
    if as_json:
        _print_json([{**item, "origin_detail": method_origin(item["name"])} for item in items])
        return
    headers = ("method", "family", "default backbone", "origin", "paper", "what it does")
    if not console.is_terminal:  # a pipe gets whole lines: one method per line, nothing cut or wrapped
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        cells = ([str(v or "").replace("|", "\\|") for v in item.values()] for item in items)
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        _write_out("\n".join(lines))
        return
    table = Table(expand=True)
    for header in headers[:3]:  # names are single words: never wrapped, never cut
        table.add_column(header, no_wrap=True)
    table.add_column("origin", overflow="fold")
    table.add_column("paper", overflow="fold", ratio=1)
    table.add_column("what it does", overflow="fold", ratio=2)
    for item in items:
        table.add_row(*(escape(str(v or "")) for v in item.values()))
    console.print(table)


@methods_app.command("info")
def methods_info(name: str, as_json: bool = typer.Option(False, "--json", help="Print JSON."),
                 plugin: list[Path] = _plugin_option()) -> None:
    """Paper, family, default backbone, hyperparameter defaults and per-dataset presets of a method.

    Example: [bold]cilbench methods info simplecil --json[/]
    """
    from cilbench.methods import METHODS, load_method
    from cilbench.methods.base import config_defaults
    from cilbench.plugins import method_origin

    cls = load_method(name)
    meta = METHODS.metadata(name)
    unused = set(getattr(cls, "unused_settings", ()))  # settings the method never reads (e.g. no training)
    info = {"name": name, "paper": meta.get("paper"), "family": meta.get("family"),
            "default_backbone": meta.get("backbone"), "summary": meta.get("summary"),
            "doc": (cls.__dict__.get("__doc__") or sys.modules[cls.__module__].__doc__ or "").strip(),
            "defaults": {k: v for k, v in config_defaults(cls).items() if k not in unused},
            "presets": cls.presets, "recipes": cls.recipes, "quick": cls.quick, "merges_tasks": cls.merges_tasks,
            "origin": method_origin(name)}
    if as_json:
        _print_json(info)
        return
    console.print(f"[bold]{name}[/] — {escape(str(info['paper']))}\nfamily: {info['family']}, "
                  f"default backbone: {info['default_backbone']}, origin: {escape(info['origin']['text'])}\n")
    console.print(info["doc"] + "\n", markup=False, highlight=False)
    table = Table("setting", "default", *sorted(cls.presets), *(f"--recipe {r}" for r in cls.recipes), "quick")
    for key, value in info["defaults"].items():
        cells = [repr(cls.presets[d][key]) if key in cls.presets[d] else "" for d in sorted(cls.presets)]
        cells += [repr(cls.recipes[r][key]) if key in cls.recipes[r] else "" for r in cls.recipes]
        table.add_row(key, escape(repr(value)), *map(escape, cells),
                      escape(repr(cls.quick[key])) if key in cls.quick else "")
    console.print(table)


# ---------------------------------------------------------------- datasets
@datasets_app.command("list")
def datasets_list(cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", envvar="CILBENCH_CACHE",
                                                           help="Whose user catalog to list (the cache folder).")
                  ) -> None:
    """List the dataset catalog: the built-in datasets and yours (`cilbench datasets add`, catalog "user").

    Example: [bold]cilbench datasets list[/]
    """
    from cilbench.data.catalog import DATASETS, DatasetSpec
    from cilbench.data.user_catalog import sync

    _user_catalog(cache_dir)
    try:
        sync()
    except CilbenchError as err:  # a damaged user catalog still lets the built-in catalog be listed
        _warn_skipped(err)
    table = Table("dataset", "classes", "source", "description", "catalog")
    for name in DATASETS.names():
        spec = DATASETS.get(name)
        where = "user" if DATASETS.metadata(name).get("user") else "built-in"
        if isinstance(spec, DatasetSpec):
            table.add_row(name, str(spec.num_classes), spec.source_line(), spec.description, where)
        else:
            table.add_row(name, "-", "sequence of " + ", ".join(spec.datasets()), spec.description, where)
    console.print(table)


@datasets_app.command("info")
def datasets_info(name: str, cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", envvar="CILBENCH_CACHE"),
                  as_json: bool = typer.Option(False, "--json")) -> None:
    """Source, classes, split rule and local state of a dataset.

    The state is "prepared" (manifest and files agree in fields and sizes), "not prepared", or "incomplete: ...",
    "corrupted: ...", "outdated: ..." with the reason; it is found without hashing (`datasets verify` hashes).

    Example: [bold]cilbench datasets info imagenet-a[/]
    """
    import dataclasses

    from cilbench.data.catalog import DatasetSpec, get_spec
    from cilbench.data.store import Store
    from cilbench.data.user_catalog import catalog_path, is_user_dataset
    from cilbench.utils import cache_dir as resolve_cache

    _user_catalog(cache_dir)
    spec = get_spec(name)
    info = dataclasses.asdict(spec)
    if is_user_dataset(name):
        info["user_catalog"] = str(catalog_path())
    if isinstance(spec, DatasetSpec):
        info["source"] = spec.source_line()
        info["split"] = spec.split_rule.describe() if spec.split_rule else "the source's train/test split"
        if spec.published_split is False:  # say it where the split is named, not only in a note below
            info["split"] += " (not the papers' split: see split_vs_papers)"
        root = resolve_cache(cache_dir) / name
        found = Store.inspect(root)
        info["prepared"] = found.store is not None
        info["state"] = found.line()
        if found.store is not None:
            info["store"] = {"path": str(root), "image_size": found.store.image_size,
                             "counts": {k: v["count"] for k, v in found.store.manifest["splits"].items()},
                             "source": found.store.manifest.get("source")}
        elif found.fix:
            info["store"] = {"path": str(root)}
            info["fix"] = found.fix
    if as_json:
        _print_json(info)
        return
    for key, value in info.items():
        if value not in (None, "", (), {}, []):
            console.print(f"[bold]{key}[/]: {escape(str(value))}")


@datasets_app.command("verify")
def datasets_verify(name: str,
                    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", envvar="CILBENCH_CACHE")) -> None:
    """Hash every file of a prepared store and compare it with the manifest (runs hash the label files and a sample
    of each image file; this reads every byte). Exit 0 when all match, 1 on the first file that does not.

    Example: [bold]cilbench datasets verify cifar100[/]
    """
    from cilbench.data.prepare import store_path
    from cilbench.data.store import Store, StoreCorrupted
    from cilbench.utils import cache_dir as resolve_cache

    _user_catalog(cache_dir)
    cache = resolve_cache(cache_dir)
    root = store_path(name, cache)
    if not Store.exists(root):
        raise CilbenchError(f"dataset {name} is not prepared in {cache}; run `cilbench datasets prepare {name}`")
    try:
        summary = Store.open(root, verify=False).verify(full=True, progress=True)
    except StoreCorrupted as err:
        raise CilbenchError(str(err), exit_code=1) from None
    console.print(summary.line(name), highlight=False)


@datasets_app.command("prepare")
def datasets_prepare(
    name: str,
    source: str = typer.Option("hub", "--source", help="hub, or a local PATH: an ImageFolder <dir>/{train,test}/"
                                                        "<class>/ or a local copy of the hub repository (your own "
                                                        "datasets: their folder unless given)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", envvar="CILBENCH_CACHE"),
    force: bool = typer.Option(False, "--force", help="Prepare again even if a store exists."),
) -> None:
    """Download (or read) a dataset, decode every image once, and write the memory-mapped store.

    Example: [bold]cilbench datasets prepare cifar100[/]  or  [bold]cilbench datasets prepare objectnet --source
    ~/data/objectnet[/]
    """
    from cilbench.data.user_catalog import prepare  # cilbench.data.prepare's, reading your datasets' folders
    from cilbench.utils import cache_dir as resolve_cache

    _user_catalog(cache_dir)
    store = prepare(name, resolve_cache(cache_dir), source=source, force=force)
    counts = ", ".join(f"{k} {store.split(k).labels.shape[0]}" for k in store.split_names)
    console.print(f"[green]prepared[/] {name}: {store.num_classes} classes, {counts}, {store.image_size}px at "
                  f"{store.root}")


@datasets_app.command("split")
def datasets_split(
    name: str,
    scenario: Optional[str] = typer.Option(None, "--scenario", help="B<base>Inc<step>, e.g. B0Inc10."),
    seed: int = typer.Option(1993, "--seed", help="Seed of the class permutation (PILOT: 1993)."),
    class_order: Optional[str] = typer.Option(None, "--class-order", help="Fixed class order: a published one "
                                              "(cifar100-icarl, tinyimagenet-zscl), identity, or seed (the seeded "
                                              "permutation, for datasets whose default is fixed, e.g. vtab)."),
    order: Optional[str] = typer.Option(None, "--order", help="MTIL order I or II."),
    as_json: bool = typer.Option(False, "--json"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", envvar="CILBENCH_CACHE",
                                             help="Cache folder whose user catalog holds your datasets."),
) -> None:
    """Class order, increments and the classes of each task, from the catalog alone (no images needed).

    Example: [bold]cilbench datasets split cifar100 --scenario B0Inc10 --seed 1993 --json[/]
    """
    from cilbench.data.scenario import build_scenario

    _user_catalog(cache_dir)
    s = build_scenario(name, scenario, seed, class_order, order)
    info = s.describe()
    if as_json:
        _print_json(info)
        return
    if s.kind == "cil":
        console.print(f"{name} {s.name}: {len(s.tasks)} tasks, increments {s.increments}, order "
                      f"{s.class_order_name}")
        for t in s.tasks:
            console.print(f"  {t.name}: {list(t.source_labels)}")
    else:
        console.print(f"{name} order {info['order']}: " + " -> ".join(info["datasets"]))


@datasets_app.command("add")
def datasets_add(
    name: str = typer.Argument(..., help="Your dataset's name: ASCII letters, digits, '-', '_' (not a built-in "
                                         "name)."),
    source: Path = typer.Option(..., "--source", help="DIR/train/<class>/* + DIR/test/<class>/*, or DIR/<class>/* "
                                                       "split by --split."),
    split: Optional[str] = typer.Option(None, "--split", help="For one folder of class folders: the seeded "
                                        "stratified split, test_fraction=0.2,seed=1993 (the default)."),
    description: str = typer.Option("", "--description", help="One line saying what the images are."),
    scenario: Optional[str] = typer.Option(None, "--scenario", help="Default scenario (default: B0Inc<N/10 "
                                           "rounded>, about ten tasks)."),
    image_size: str = typer.Option("256", "--image-size", help="Side of the stored square images, or native "
                                   "(every image square and of one size, e.g. 8 x 8 digits)."),
    force: bool = typer.Option(False, "--force", help="Replace an entry of the same name."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", envvar="CILBENCH_CACHE",
                                             help="Cache folder; its user-catalog.json holds the entry."),
) -> None:
    """Register a local ImageFolder as your own dataset, in the user catalog of the cache folder (JSON, no code).

    It then works with datasets prepare / split / info, run, sweep (a suite YAML naming it) and table like a
    catalog entry, with no presets and no paper numbers.

    Example: [bold]cilbench datasets add flowers5 --source ~/data/flowers5 --split test_fraction=0.2,seed=1993[/]
    """
    from cilbench.data.store import Store
    from cilbench.data.user_catalog import active_cache, add_dataset, catalog_path

    _user_catalog(cache_dir)
    entry, found = add_dataset(name, source, split, description, scenario, force, image_size)
    how = "its train/ and test/" if entry["layout"] == "train-test" else \
        "a stratified split, test_fraction={test_fraction}, seed={seed}".format(**entry["split"])
    console.print(f"[green]added[/] {name}: {entry['num_classes']} classes, {found['train']} train / {found['test']} "
                  f"test images ({how}), default scenario {entry['default_scenario']} -> {catalog_path()}",
                  soft_wrap=True, highlight=False)
    if Store.exists(active_cache() / name):
        console.print(f"a store of {name} is already prepared: rebuild it with `cilbench datasets prepare {name} "
                      f"--force`", soft_wrap=True, highlight=False)
    else:
        console.print(f"next: cilbench datasets prepare {name}", soft_wrap=True, highlight=False)


@datasets_app.command("remove")
def datasets_remove(
    name: str,
    delete_store: bool = typer.Option(False, "--delete-store", help="Also delete its prepared store."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", envvar="CILBENCH_CACHE"),
) -> None:
    """Remove one of your datasets from the user catalog (run records are kept; the store too, unless
    --delete-store).

    Example: [bold]cilbench datasets remove flowers5[/]
    """
    from cilbench.data.user_catalog import catalog_path, remove_dataset

    _user_catalog(cache_dir)
    deleted = remove_dataset(name, delete_store)
    console.print(f"removed {name} from {catalog_path()}" + (f"; deleted its store {deleted}" if deleted else ""),
                  soft_wrap=True, highlight=False)


# ---------------------------------------------------------------- run
@app.command("run")
def run(
    method: str,
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset or sequence name (cilbench datasets list)."),
    scenario: Optional[str] = typer.Option(None, "--scenario", "-s",
                                           help="B<base>Inc<step> (default: the dataset's usual split)."),
    order: Optional[str] = typer.Option(None, "--order", help="MTIL order I or II."),
    class_order: Optional[str] = typer.Option(None, "--class-order", help="Fixed class order: a published one "
                                              "(cifar100-icarl, tinyimagenet-zscl), identity, or seed (the seeded "
                                              "permutation, for datasets whose default is fixed, e.g. vtab)."),
    seed: int = typer.Option(1993, "--seed"),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Backbone (default: the method's)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Local weights file for the backbone."),
    set_: list[str] = typer.Option([], "--set", help="Override a method setting: key=value (repeatable)."),
    out: Path = typer.Option(Path("results"), "--out", help="Folder for the run record."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue after the last finished task."),
    quick: bool = typer.Option(False, "--quick", help="Smoke profile: tiny random backbone, few epochs, subset."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", envvar="CILBENCH_CACHE"),
    tag: str = typer.Option("", "--tag", help="Extra label in the record's file name."),
    shots: Optional[int] = typer.Option(None, "--shots", help="Few-shot: train on N images per class, drawn once "
                                        "per seed (mtil-fewshot: 5); the scenario is named ...-Nshot."),
    joint: bool = typer.Option(False, "--joint", help="The method's joint upper bound: its own recipe on one task "
                               "holding every class; the scenario is named ...-joint."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A named bundle of settings the method declares "
                                         "(e.g. l2p's official): applied as --set values; your --set win."),
    feature_cache: bool = typer.Option(True, "--feature-cache/--no-feature-cache", help="Encode each image once "
                                       "per state of a method's frozen encoder (SimpleCIL, APER, RanPAC), kept in "
                                       "<cache>/.features for later runs; --no-feature-cache re-encodes every time."),
    plugin: list[Path] = _plugin_option(),
) -> None:
    """Run one method on one benchmark and write a run record.

    Example: [bold]cilbench run simplecil --dataset digits --quick[/]  or  [bold]cilbench run simplecil --dataset
    imagenet-a --scenario B0Inc20[/]
    """
    from cilbench.engine.runner import RunOptions, Runner
    from cilbench.methods.base import parse_sets

    _user_catalog(cache_dir)
    opts = RunOptions(method=method, dataset=dataset, scenario=scenario, order=order, class_order=class_order,
                      seed=seed, backbone=backbone, weights=weights, sets=parse_sets(set_), out=out, device=device,
                      resume=resume, quick=quick, cache_dir=cache_dir, tag=tag, shots=shots, joint=joint,
                      recipe=recipe, feature_cache=feature_cache)
    runner = Runner(opts, console=console)
    label = " " + escape(f"[{runner.config_label()}]") if runner.config_label() else ""
    console.print(f"[bold]{method}[/]{label} on {dataset} {runner.scenario.name} ({len(runner.scenario.tasks)} "
                  f"tasks), backbone {runner.backbone_name}, seed {seed}, device {runner.device}"
                  + (" [yellow](quick: not comparable to papers)[/]" if quick else ""))
    try:
        with _progress() as factory:
            record, path = runner.run(progress_factory=factory)
    except KeyboardInterrupt:
        argv = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
        raise CilbenchError(runner.interrupted_message("cilbench " + shlex.join(argv)), exit_code=130) from None
    _print_summary(record, path)


@app.command("bench")
def bench_cmd(
    method: str,
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Backbone shape, random weights (default: "
                                           "the method's on CUDA, vit-mini on CPU)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Default: the method's on CUDA, 8 on CPU."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Timed steps per mode (default 20 CUDA, 5 CPU)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed steps first."),
    set_: list[str] = typer.Option([], "--set", help="Override a method setting: key=value (repeatable)."),
    compare_naive: bool = typer.Option(False, "--compare-naive", help="Also time both steps end to end, data "
                                       "loading included: our uint8 store + device transform against a PILOT-style "
                                       "JPEG + PIL DataLoader in float32."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader processes of the naive pipeline "
                                          "(default min(8, CPUs))."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    plugin: list[Path] = _plugin_option(),
) -> None:
    """Time a method's training and inference steps on synthetic data: images/s, peak memory, FLOPs and, on
    CUDA, TFLOP/s against the device's bf16 matmul rate. CICAE is timed with batched and sequential experts.

    Example: [bold]cilbench bench cicae[/]  or  [bold]cilbench bench moe-adapters --backbone clip-vit-b16[/] (also
    prints the parameter counts of MoE-Adapters Table 5)  or  [bold]cilbench bench cicae --compare-naive[/] (our
    data pipeline against a LAMDA-PILOT-style JPEG DataLoader, end to end)
    """
    from cilbench.bench import bench
    from cilbench.engine.runner import pick_device
    from cilbench.methods.base import parse_sets

    dev = pick_device(device)
    with _progress() as factory:
        result = bench(method, backbone, batch_size, dev, steps, warmup, parse_sets(set_), factory, compare_naive,
                       workers)
    if as_json:
        _print_json(result)
        return
    cuda = dev.type == "cuda"
    table = Table("mode", "train img/s", "infer img/s", "train ms/step", "infer ms/step", "GFLOP/img train",
                  "GFLOP/img infer", *(["train TFLOP/s", "infer TFLOP/s", "of bf16 peak (train)"] if cuda else []),
                  "peak MB" + ("" if cuda else " (process RSS)"),
                  title=f"{method} on {result['backbone']}, batch {result['batch_size']}, {result['device']}")
    for r in result["modes"]:
        cells = [r["mode"], str(r["train_images_per_s"] or "-"), str(r["infer_images_per_s"]),
                 str(r["train_step_ms"] or "-"), str(r["infer_step_ms"]), str(r["train_gflop_per_image"] or "-"),
                 str(r["infer_gflop_per_image"])]
        if cuda:
            frac = r["train_fraction_of_peak"]
            cells += [str(r["train_tflops"] or "-"), str(r["infer_tflops"]), f"{100 * frac:.1f}%" if frac else "-"]
        table.add_row(*cells, str(r["peak_memory_mb"]))
    console.print(table)
    unit = "bf16" if cuda else "float32"
    console.print(f"device matmul rate ({unit}): {result['matmul_peak_tflops']} TFLOP/s")
    ratio = result.get("batched_over_sequential")
    if ratio:
        console.print(f"batched / sequential experts: training x{ratio['train']}, inference x{ratio['inference']}")
    for what, count in (result.get("parameters") or {}).items():
        console.print(f"parameters, {what.replace('_', ' ')}: {count:,} ({count / 1e6:.1f}M)")
    cmp = result.get("compare_naive")
    if cmp:
        table = Table("pipeline", "train img/s", "infer img/s", "data wait train/infer",
                      f"train TFLOP/s (of {unit} peak)",
                      title=f"end to end, {cmp['images']} images of {cmp['image_size']} px (naive: JPEG q"
                            f"{cmp['jpeg_quality']}, {cmp['jpeg_kb_mean']} KB, {cmp['workers']} workers)")
        for name in ("ours", "naive"):
            r = cmp[name]
            waits = " / ".join("-" if w is None else f"{100 * w:.0f}%" for w in (r["train_data_wait"],
                                                                                  r["infer_data_wait"]))
            frac = r["train_fraction_of_peak"]
            table.add_row(f"{name} ({r['precision']})", str(r["train_images_per_s"] or "-"),
                          str(r["infer_images_per_s"]), waits,
                          f"{r['train_tflops']} ({100 * frac:.1f}%)" if frac else "-")
        console.print(table)
        ratio = cmp["ratio"]
        console.print(f"ours / naive: training x{ratio['train'] or '-'}, inference x{ratio['inference']}")


@app.command("bench-store")
def bench_store_cmd(
    images: int = typer.Option(512, "--images", help="Synthetic photo-like 256 px images to store."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Decode threads (default: the usable cores)."),
    batch_size: int = typer.Option(128, "--batch-size"),
    step_ms: Optional[float] = typer.Option(None, "--step-ms", help="A train step's time on your device, ms "
                                            "(default: ViT-B/16 batch 128 on an H100 and on a 2-core CPU)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (cuda adds nvJPEG decoding)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Raw uint8 store against a JPEG store: disk per image and the time to make one training batch (memmap
    gather; JPEG decoded by torchvision or PIL on CPU threads, or by nvJPEG on CUDA), whether each decoder releases
    the GIL, and the decode workers each needs for data wait under 5% of a step.

    Example: [bold]cilbench bench-store --images 1024 --step-ms 130[/]
    """
    from cilbench.bench_store import bench_store, format_table
    from cilbench.engine.runner import pick_device

    for flag, value in (("--images", images), ("--batch-size", batch_size), ("--threads", threads or 1)):
        if value < 1:
            raise CilbenchError(f"{flag} must be at least 1, not {value}")
    result = bench_store(images=images, batch_size=batch_size, threads=threads, device=pick_device(device),
                         step_ms=step_ms)
    if as_json:
        _print_json(result)
        return
    console.print(format_table(result), markup=False, highlight=False, soft_wrap=True)


class _progress:
    """A rich progress bar per training task; the factory returns an ``update(n, loss)`` callable."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), console=console,
                                 transient=True)
        self.progress.__enter__()

        def factory(description: str, total: int):
            tid = self.progress.add_task(description, total=total, loss="-")
            done = 0

            def update(n: int, loss: float | None = None) -> None:
                """``n`` more steps done; ``loss`` (the trainer passes it once per epoch) updates the shown loss."""
                nonlocal done
                if done >= total:  # finished and removed
                    return
                done += n
                fields = {} if loss is None else {"loss": f"{loss:.4f}"}
                self.progress.update(tid, advance=n, **fields)
                if done >= total:
                    self.progress.remove_task(tid)

            return update

        return factory

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


def _print_summary(record: dict, path: Path) -> None:
    m = record["metrics"]
    if record["kind"] == "cil":
        line = f"A_avg {m['A_avg']:.2f}  A_last {m['A_last']:.2f}"
        if m.get("forgetting") is not None:
            line += f"  forgetting {m['forgetting']:.2f}"
    else:
        tr = "-" if m["transfer"] is None else f"{m['transfer']:.2f}"
        line = f"Transfer {tr}  Average {m['average']:.2f}  Last {m['last']:.2f}"
    t = record["timings"]
    train_s = sum(x["train_s"] for x in t["tasks"])
    eval_s = sum(x["eval_s"] for x in t["tasks"])
    fc = record.get("feature_cache") or {}
    cached = f", features {fc['encoded_images']} encoded / {fc['reused_images']} reused" \
        if fc.get("encoded_images", 0) + fc.get("reused_images", 0) else ""
    console.print(f"[bold green]{record['method']}[/] {record['dataset']} {record['scenario']}: {line}\n"
                  f"train {train_s:.1f}s, eval {eval_s:.1f}s{cached}, total {t['total_s']:.1f}s -> {path}")


# ---------------------------------------------------------------- metrics, table, check
def _warn_skipped(item: Any) -> None:
    """One stderr line per results file that was not read as a run record (``iter_records``' ``on_skip``)."""
    err_console.print(f"warning: {item}", markup=False, highlight=False, soft_wrap=True)


def _write_out(text: str) -> None:
    """Plain text to stdout as is (no rich wrapping), through the pipe-safe console file."""
    console.file.write(text if text.endswith("\n") else text + "\n")
    console.file.flush()


@app.command("metrics")
def metrics_cmd(
    file: Path,
    kind: Optional[str] = typer.Option(None, "--kind", help="cil or mtil (default: from the record, else cil)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Score an accuracy matrix: A_avg / A_last / forgetting, or MTIL Transfer / Average / Last.

    The matrix is a JSON, CSV or run record file; rows = after task i, columns = task j, percent.

    Example: [bold]cilbench metrics matrix.csv --kind mtil[/]
    """
    from cilbench.results.matrix_io import score_matrix

    if kind not in (None, "cil", "mtil"):
        raise CilbenchError(f"--kind must be cil or mtil, not {kind!r}")
    result = score_matrix(file, kind)
    if as_json:
        _print_json(result)
        return
    table = Table("metric", "value")
    for key, value in result.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.2f}")
        elif isinstance(value, list):
            table.add_row(key, ", ".join("-" if v is None else f"{v:.2f}" for v in value))
        elif value is not None:
            table.add_row(key, str(value))
    console.print(table)


@app.command("table")
def table_cmd(
    results: Path = typer.Option(Path("results"), "--results", help="Folder of run records."),
    fmt: str = typer.Option("rich", "--format", help="rich, markdown, csv or latex."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file instead of printing "
                                                                    "(rich becomes markdown in a file)."),
    paper: bool = typer.Option(True, "--paper/--no-paper", help="Show stored paper numbers and deltas."),
    benchmark: Optional[str] = typer.Option(None, "--benchmark", "-b", help="Lay out a paper's table from its "
                                            "suite (benchmarks/suites/NAME.yaml; cilbench sweep --list)."),
    quick: bool = typer.Option(False, "--quick", help="With --benchmark: show the suite's quick-profile runs."),
    plugin: list[Path] = _plugin_option(),
) -> None:
    """Method x dataset tables of our runs (mean ± std over seeds) beside the papers' numbers.

    A_avg / A_last (Transfer / Average / Last for MTIL), with the paper's number and the difference where one is
    stored. Runs with other settings (--set, --weights) get rows of their own, e.g. "cicae [lambda1=0, lambda2=0]".
    With --benchmark, a paper's table as printed (its rows, columns and marks) with our runs beside its numbers.
    Piped or redirected, rich becomes markdown; a table wider than the terminal is split into several.

    Example: [bold]cilbench table --results results --format markdown[/]  or  [bold]cilbench table --benchmark
    mos-table1[/]
    """
    from cilbench.results.references import load_references
    from cilbench.results.tables import FORMATS, build_table, fold_rich, render, suite_table
    from cilbench.utils import atomic_write_text, check_writable

    if fmt not in FORMATS:
        raise CilbenchError(f"unknown table format {fmt!r} (one of {', '.join(FORMATS)})")
    if output:
        output = check_writable(output, "table")  # before any record is read
    if benchmark:
        from cilbench.suites import load_suite

        tables = suite_table(load_suite(benchmark), results, load_references() if paper else None,
                             "quick" if quick else "full", on_skip=_warn_skipped)
    else:
        tables = [build_table(results, load_references() if paper else None, on_skip=_warn_skipped)]
    if fmt == "rich" and (output or not console.is_terminal):
        fmt = "markdown"  # a file or a pipe gets the whole table, not one cut to a terminal's width
    if output:
        atomic_write_text(output, "\n".join(render(t, fmt) for t in tables))
        console.print(f"wrote {output}", markup=False, highlight=False, soft_wrap=True)
    elif fmt != "rich":
        _write_out("\n".join(render(t, fmt) for t in tables))
    else:
        for t in tables:
            for part in fold_rich(t, console.width):
                console.print(part)


@app.command("sweep")
def sweep_cmd(
    suite: Optional[str] = typer.Argument(None, help="Suite name (benchmarks/suites/NAME.yaml) or a YAML path."),
    results: Path = typer.Option(Path("results"), "--results", "--out", help="Folder of run records."),
    quick: bool = typer.Option(False, "--quick", help="Smoke profile for every run (tiny backbone, few epochs)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would run."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", envvar="CILBENCH_CACHE"),
    list_: bool = typer.Option(False, "--list", help="List the suites."),
    restart: bool = typer.Option(False, "--restart", help="Start unfinished runs over instead of resuming their "
                                 "checkpoints (e.g. one that cannot be resumed)."),
    plugin: list[Path] = _plugin_option(),
    executor: str = typer.Option("local", "--executor", help="local (one run after another here) or slurm (one "
                                 "SLURM job array, a task per missing run, through submitit)."),
    status: bool = typer.Option(False, "--status", help="Only show each run's state (done, missing; with --executor "
                                "slurm also queued, running, failed with its error)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="slurm: resubmit exactly the failed runs."),
    partition: Optional[str] = typer.Option(None, "--partition", help="slurm: the partition."),
    gpus_per_job: int = typer.Option(1, "--gpus-per-job", help="slurm: GPUs per run (--gres=gpu:N; 0: none)."),
    cpus: Optional[int] = typer.Option(None, "--cpus", help="slurm: CPUs per run (--cpus-per-task)."),
    mem: Optional[str] = typer.Option(None, "--mem", help="slurm: memory per run, e.g. 64G."),
    time_min: int = typer.Option(240, "--time", help="slurm: time limit per job in minutes (a run that needs "
                                 "longer is requeued and resumes)."),
    array_parallelism: int = typer.Option(256, "--array-parallelism", help="slurm: most runs at once."),
    account: Optional[str] = typer.Option(None, "--account", help="slurm: the account to charge."),
    qos: Optional[str] = typer.Option(None, "--qos", help="slurm: the quality of service."),
) -> None:
    """Run every run of a paper table's suite whose record is missing, one after another on this machine.

    Existing records are skipped, an interrupted run resumes. Exit 1 when a run failed. The suites:
    [bold]cilbench sweep --list[/]. With [bold]--executor slurm[/] the missing runs are submitted as one SLURM job
    array instead (records land in --results as jobs end); [bold]--status[/] shows where each run stands and
    [bold]--retry-failed[/] resubmits the failed ones.

    Example: [bold]cilbench sweep mos-table1 --dry-run[/]  or  [bold]cilbench sweep cicae-table4[/]  or
    [bold]cilbench sweep mos-table1 --executor slurm --partition gpu --mem 64G[/]
    """
    from cilbench.suites import list_suites, load_suite, sweep

    _user_catalog(cache_dir)
    if list_ or suite is None:
        table = Table("suite", "paper table", "rows x columns", "runs")
        for name in list_suites():
            s = load_suite(name)
            table.add_row(name, escape(s.title), f"{len(s.rows)} x {len(s.columns)}", str(len(s.runs())))
        console.print(table)
        return
    if executor not in ("local", "slurm"):
        raise CilbenchError(f"unknown executor {executor!r} (local or slurm)")
    if executor == "slurm" or status or retry_failed:
        from cilbench.cluster import SlurmResources

        _sweep_cluster(load_suite(suite), results, quick, device, cache_dir, dry_run, restart, plugin, executor,
                       status, retry_failed, SlurmResources(partition, gpus_per_job, cpus, mem, time_min,
                                                            array_parallelism, account, qos))
        return
    for flag, value in (("--partition", partition), ("--cpus", cpus), ("--mem", mem), ("--account", account),
                        ("--qos", qos)):
        if value is not None:
            raise CilbenchError(f"{flag} applies to --executor slurm only; drop it to run here")
    s = load_suite(suite)
    console.print(f"[bold]{escape(s.title)}[/]: {len(s.runs())} runs" + (" [yellow](quick)[/]" if quick else ""))
    try:
        with _progress() as factory:
            items = sweep(s, results, quick, device, cache_dir, dry_run, factory,
                          lambda text: console.print(text, soft_wrap=True), restart)  # one line a run: grep-able
    except KeyboardInterrupt:
        argv = [a for a in sys.argv[1:] if a != "--restart"]
        raise CilbenchError("interrupted; finished runs keep their records and the current run its last "
                            f"checkpoint; continue with: cilbench {shlex.join(argv)}", exit_code=130) from None
    counts = {k: sum(i.status == k for i in items) for k in ("done", "ran", "failed", "planned")}
    console.print(f"{counts['done']} already done, {counts['ran']} ran, {counts['failed']} failed"
                  + (f", {counts['planned']} to run" if dry_run else ""))
    if counts["failed"]:
        raise typer.Exit(1)


def _sweep_cluster(s, results: Path, quick: bool, device: str, cache_dir: Optional[Path], dry_run: bool,
                   restart: bool, plugin: list[Path], executor: str, status: bool, retry_failed: bool,
                   resources) -> None:
    """``sweep --executor slurm`` (submit the missing runs as one job array), ``--status`` and ``--retry-failed``."""
    from cilbench import cluster

    if retry_failed and executor != "slurm":
        raise CilbenchError("--retry-failed resubmits failed SLURM jobs: add --executor slurm (a local sweep "
                            "retries a failed run when run again)")
    if status and retry_failed:
        raise CilbenchError("--status only shows the runs; run --retry-failed without it")
    resources.check()
    if executor == "slurm":
        cluster.check_slurm()
    folder = cluster.jobs_folder(results, s.name)
    console.print(f"[bold]{escape(s.title)}[/]: {len(s.runs())} runs" + (" [yellow](quick)[/]" if quick else ""))
    states = cluster.plan(s, results, quick, device, cache_dir)
    if executor == "slurm":
        states = cluster.job_states(folder, states)
    elif status and (folder / cluster.INDEX_NAME).is_file():
        console.print("[yellow]runs of this suite were submitted to SLURM[/]: see their jobs with --status "
                      "--executor slurm", soft_wrap=True)
    if not status:
        wanted = "failed" if retry_failed else "missing"
        todo = [st for st in states if st.state == wanted and st.opts is not None]
        if dry_run:
            for st in todo:
                console.print(f"would submit {escape(st.where())} -> {st.record}", soft_wrap=True)
            console.print(f"{len(todo)} to submit")
            return
        if todo:
            files = tuple(str(Path(p).resolve()) for p in plugin)
            done = cluster.submit(s, todo, folder, resources, restart, files)
            array = done[0].job_id.split("_")[0]
            console.print(f"submitted job array {array}: {len(done)} runs; jobs' files in {folder}; see them with: "
                          f"cilbench sweep {shlex.quote(str(s.path))} --results {shlex.quote(str(results))} "
                          f"--status --executor slurm" + (" --quick" if quick else ""), soft_wrap=True, markup=False)
        else:
            console.print(f"nothing to {'resubmit' if retry_failed else 'submit'}")
    for line in cluster.status_lines(states, escape):
        console.print(line, soft_wrap=True, highlight=False)  # one line a run: grep-able
    failed = [st for st in states if st.state == "failed"]
    if failed and not status:
        console.print(f"[red]{len(failed)} failed[/]: resubmit them with --retry-failed", soft_wrap=True)
        raise typer.Exit(1)


@app.command("plot")
def plot_cmd(
    what: str = typer.Argument(..., help="curves (A_t per task, one line per method), matrix (a record's "
                                         "accuracy matrix as a heat map) or scaling (a suite's A_last against the "
                                         "number of tasks)."),
    record: Optional[Path] = typer.Argument(None, help="matrix: the run record (JSON)."),
    results: Path = typer.Option(Path("results"), "--results", help="curves, scaling: folder of run records."),
    benchmark: Optional[str] = typer.Option(None, "--benchmark", "-b", help="scaling: the suite (e.g. ham-scaling)."),
    metric: str = typer.Option("A_last", "--metric", help="scaling: the metric on the y axis."),
    quick: bool = typer.Option(False, "--quick", help="scaling: the suite's quick-profile smoke runs."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="curves: the dataset."),
    scenario: Optional[str] = typer.Option(None, "--scenario", "-s", help="curves: the scenario (default: the "
                                                                          "only one found)."),
    output: Path = typer.Option(..., "--output", "-o", help="PNG file to write."),
) -> None:
    """Plots as PNG: accuracy-per-task curves per method, or an accuracy matrix (e.g. MTIL) as a heat map.

    Tasks are numbered from 1 in both plots. Curves: one line per method (and configuration), the legend beside the
    axes; a one-task run (joint training) is a marked point with a dotted level line.

    Scaling: one panel per dataset of the suite, the metric against the number of tasks of its columns, one line
    per row (the runs the sweep makes for it).

    Example: [bold]cilbench plot curves --dataset imagenet-a -o curves.png[/]  or  [bold]cilbench plot matrix
    results/RUN.json -o matrix.png[/]  or  [bold]cilbench plot scaling --benchmark ham-scaling -o scaling.png[/]
    """
    from cilbench.results.plots import check_png_output, plot_curves, plot_matrix, plot_scaling

    if what not in ("curves", "matrix", "scaling"):
        raise CilbenchError(f"unknown plot {what!r} (curves, matrix or scaling)")
    output = check_png_output(output)  # before any record is read or any figure drawn
    if what == "scaling":
        if not benchmark:
            raise CilbenchError("plot scaling needs --benchmark SUITE (e.g. ham-scaling)")
        from cilbench.suites import load_suite

        plot_scaling(load_suite(benchmark), results if results.is_dir() else None, output,
                     "quick" if quick else "full", metric, on_skip=_warn_skipped)
    elif what == "curves":
        if not dataset:
            raise CilbenchError("plot curves needs --dataset")
        plot_curves(results, dataset, scenario, output, on_skip=_warn_skipped)
    else:
        if record is None:
            raise CilbenchError("plot matrix needs a run record: cilbench plot matrix RUN.json -o matrix.png")
        plot_matrix(record, output)
    console.print(f"wrote {output}", markup=False, highlight=False, soft_wrap=True)


@app.command("check")
def check_cmd(
    against: str = typer.Option(..., "--against", help="'paper' (the stored paper numbers) or a results folder."),
    results: Path = typer.Option(Path("results"), "--results", help="Folder of run records to check."),
    tolerance: float = typer.Option(1.0, "--tolerance", help="Allowed drop in percentage points."),
    show_all: bool = typer.Option(False, "--all", help="Show every compared metric, not only regressions."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Pass although runs of the reference folder "
                                       "(groups or seeds) have no counterpart in --results."),
    allow_damaged: bool = typer.Option(False, "--allow-damaged", help="Pass although a run record under either "
                                       "folder is damaged (truncated, wrong field types, newer schema)."),
) -> None:
    """Regression check for CI: exit 1 when a metric falls more than the tolerance below the reference.

    Runs are compared with runs of the same identity, configuration (--set, --weights) included. Also exit 1 when
    a run of the reference folder is missing from --results or a run record is damaged (each skipped file is one
    warning line), unless --allow-missing / --allow-damaged; exit 0 otherwise.

    Example: [bold]cilbench check --results results --against baseline-results --tolerance 0.5[/]
    """
    import dataclasses

    from cilbench.results.check import check, render_check

    if against != "paper" and not Path(against).is_dir():
        raise CilbenchError(f"--against must be 'paper' or an existing results folder; {against} is neither")
    result = check(results, "paper" if against == "paper" else Path(against), tolerance, on_skip=_warn_skipped,
                   allow_missing=allow_missing, allow_damaged=allow_damaged)
    failing = {"regressed"} | (set() if allow_missing else {"missing-run"})
    shown = result if show_all else dataclasses.replace(result, rows=[r for r in result.rows if r.status in failing])
    if shown.rows:
        console.print(render_check(shown))
    if not result.compared:
        raise CilbenchError(result.summary() + "; comparing nothing is not a pass", exit_code=1)
    console.print(result.summary(), markup=False, highlight=False, soft_wrap=True)
    for line in result.failures:
        err_console.print(f"check failed: {line}", markup=False, highlight=False, soft_wrap=True)
    if result.failed:
        raise typer.Exit(1)


def main() -> None:
    try:
        code = app(standalone_mode=False)  # click returns Exit codes instead of raising without standalone mode
        if isinstance(code, int) and code:
            raise SystemExit(code)
    except CilbenchError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise SystemExit(err.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise SystemExit(130)
    except (typer.Exit, SystemExit) as e:
        raise SystemExit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except Exception as err:
        for exc in _click_exception_modules():
            if isinstance(err, getattr(exc, "NoArgsIsHelpError", ())):
                raise SystemExit(0)  # the help has been printed: asking for it is not an error
            if isinstance(err, exc.ClickException):
                err.show()
                raise SystemExit(err.exit_code)
            if isinstance(err, getattr(exc, "Abort", ())):
                err_console.print("aborted")
                raise SystemExit(1)
        raise


def _click_exception_modules() -> list:
    """click's exception classes, and typer's vendored copy of them (typer >= 0.2x ships its own click)."""
    import importlib

    mods = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass
    return mods


if __name__ == "__main__":
    main()
