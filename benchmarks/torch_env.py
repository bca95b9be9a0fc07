"""Makes torchvision importable next to the CPU build of torch (tests and benchmarks only).

torchvision's PyPI wheel for Linux is built against CUDA torch; with the CPU build of torch its C
extension (detection operators only) cannot load, and ``import torchvision`` then fails while
registering fake kernels for ``torchvision::nms`` and ``torchvision::qnms``. The models and
transforms we use as references are pure Python, so when the extension does not load we declare
those two operator schemas before torchvision is imported. Call this before importing torchvision.
"""

import glob
import importlib.util
import os

_LIBRARY = None  # keeps the declared operator library alive for the process


def declare_missing_torchvision_ops() -> None:
    """Declares ``torchvision::nms``/``qnms`` if torchvision's C extension cannot load. Idempotent."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
        return
    import torch

    tv_dir = importlib.util.find_spec("torchvision").submodule_search_locations[0]
    for ext in glob.glob(os.path.join(tv_dir, "_C*.so")):
        try:
            torch.ops.load_library(ext)
            return  # the extension works here: torchvision registers its own operators
        except OSError:
            pass
    _LIBRARY = torch.library.Library("torchvision", "DEF")  # noqa: TOR901
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


WHY = (
    "torchvision from PyPI is built against the CUDA build of torch; next to the CPU torch 2.13.0 wheel its C "
    "extension does not load and 'import torchvision' fails with \"operator torchvision::nms does not exist\". "
    "Call benchmarks.torch_env.declare_missing_torchvision_ops() before importing torchvision (the tests do, in "
    "tests/conftest.py), or install a pair that imports cleanly: pip install torch==2.14.1 torchvision==0.29.1 "
    "(a CUDA build, about 5.5 GB)"
)


def import_torchvision():
    """``import torchvision`` next to the CPU build of torch: declares the missing operators first.

    Returns:
        The torchvision module.

    Raises:
        ImportError: with the reason and the two ways out when torchvision still cannot be imported.
    """
    declare_missing_torchvision_ops()
    try:
        import torchvision
    except RuntimeError as error:  # the operator registration failure
        raise ImportError(f"cannot import torchvision ({error}): {WHY}") from error
    return torchvision
