"""The names of the models distdl builds, checked without importing torch.

The driver of `distdl train` checks the name before Ray starts, and imports no torch for distdl's
own models: importing it took the driver about 1.5 s of a core. Only torchvision's names need
torchvision (and so torch) to be listed.
"""

from __future__ import annotations

from distdl.errors import UserError

TORCHVISION = "torchvision:"
OWN = ("small_cnn", "resnet18")


def model_names() -> list[str]:
    """Every name build_model accepts: our own models, then each torchvision classifier."""
    return list(OWN) + [TORCHVISION + n for n in torchvision_names()]


def check_name(name: str) -> None:
    """Raise a UserError for a name that build_model does not know, building nothing."""
    if name in OWN:
        return
    if not name.startswith(TORCHVISION):
        raise UserError(f"unknown model '{name}'; choose small_cnn, resnet18 or torchvision:NAME "
                        "(e.g. torchvision:mobilenet_v3_small)")
    if name.removeprefix(TORCHVISION) not in torchvision_names():
        raise UserError(f"unknown torchvision model '{name.removeprefix(TORCHVISION)}'; choose "
                        "one of: " + ", ".join(torchvision_names()))


def torchvision_names() -> list[str]:
    import torchvision  # on demand: importing it costs every Ray worker about 1.5 s

    return torchvision.models.list_models(module=torchvision.models)
