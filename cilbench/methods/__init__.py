"""Registered methods. The map below is lazy (name -> "module:Class") so the CLI starts without importing torch;
each module's ``@register_method`` decorator adds the metadata when it is imported. Methods from outside
(``--plugin`` files, the ``cilbench.methods`` entry-point group) join through ``cilbench.plugins``; ``load_method``
is the one way to a method class."""

from __future__ import annotations

from typing import Callable

from cilbench.methods.base import METHODS, Method

_LAZY = {
    "finetune": "cilbench.methods.finetune:Finetune",
    "joint": "cilbench.methods.finetune:Joint",
    "simplecil": "cilbench.methods.simplecil:SimpleCIL",
    "zeroshot-clip": "cilbench.methods.zeroshot_clip:ZeroShotCLIP",
    "slca": "cilbench.methods.slca:SLCA",
    "ease": "cilbench.methods.ease:EASE",
    "l2p": "cilbench.methods.l2p:L2P",
    "dualprompt": "cilbench.methods.dualprompt:DualPrompt",
    "coda-prompt": "cilbench.methods.coda_prompt:CodaPrompt",
    "finetune-adapter": "cilbench.methods.finetune_adapter:FinetuneAdapter",
    "aper-adapter": "cilbench.methods.aper:AperAdapter",
    "ranpac": "cilbench.methods.ranpac:RanPAC",
    "cicae": "cilbench.methods.cicae:CICAE",
    "icarl": "cilbench.methods.icarl:ICaRL",
    "der": "cilbench.methods.der:DER",
    "dne": "cilbench.methods.dne:DNE",
    "dytox": "cilbench.methods.dytox:DyTox",
    "podnet": "cilbench.methods.podnet:PODNet",
    "foster": "cilbench.methods.foster:FOSTER",
    "moe-adapters": "cilbench.methods.moe_adapters:MoEAdapters",
    "continual-ft": "cilbench.methods.zscl:ContinualFT",
    "lwf": "cilbench.methods.zscl:LwF",
    "lwf-vr": "cilbench.methods.zscl:LwFVR",
    "icarl-clip": "cilbench.methods.zscl:ICaRLCLIP",
    "wise-ft": "cilbench.methods.zscl:WiSEFT",
    "zscl": "cilbench.methods.zscl:ZSCL",
    "ham": "cilbench.methods.ham:HAM",
    "lora-seq": "cilbench.methods.lora_cl:LoRASeq",
    "lora-per-task": "cilbench.methods.lora_cl:LoRAPerTask",
    "inflora": "cilbench.methods.inflora:InfLoRA",
}
BUILTIN_METHODS = frozenset(_LAZY)  # the published methods: a plugin may never take one of these names
for _name, _target in _LAZY.items():
    if _name not in METHODS:
        METHODS.register(_name, _target)


def load_method(name: str) -> type[Method]:
    """The method class; methods from outside (entry points, ``--plugin`` files) fail in one line naming their
    origin (``cilbench.plugins``)."""
    from cilbench.plugins import load_method as _load

    return _load(name)


def load_all(on_error: Callable[[str], None] | None = None) -> list[str]:
    """Load every registered method and return the names. A method from outside that cannot be loaded is left out
    and reported to ``on_error`` (one line) when given, else raised."""
    from cilbench.errors import CilbenchError
    from cilbench.plugins import load_requested, register_entry_points

    load_requested()  # --plugin files and $CILBENCH_PLUGINS
    register_entry_points()  # and packages installed since start-up
    names = []
    for name in METHODS.names():
        try:
            load_method(name)
            names.append(name)
        except CilbenchError as err:
            if on_error is None:
                raise
            on_error(str(err))
    return names


# packages that declare methods in the `cilbench.methods` entry-point group: registered by name, imported on use
from cilbench.plugins import register_entry_points  # noqa: E402

register_entry_points()
