"""``threedgen doctor``: what this machine gives a run — CUDA devices, gsplat's and nerfacc's
kernels (built, buildable, unavailable), tiny-cuda-nn, and the backends ``auto`` would pick."""

from __future__ import annotations

import importlib.util

import torch

from threedgen import kernels
from threedgen.devices import resolve_device


def report(build: bool = False, retry: bool = False) -> dict:
    """The machine's report; ``build`` loads (building once, under the lock) the CUDA kernels
    rather than only looking for them; ``retry`` builds again after an earlier failed or killed build."""
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2 ** 30, 1)})
    extensions = {name: (kernels.load(name, retry=retry) if build or retry else kernels.probe(name)).as_dict()
                  for name in kernels.EXTENSIONS}
    tcnn = importlib.util.find_spec("tinycudann") is not None
    device = resolve_device("auto")
    cuda = device.type == "cuda"

    def pick(name: str, kernel_path: str, fallback: str) -> str:
        status = extensions[name]["status"]
        if not cuda:
            return fallback
        if status in ("built", "prebuilt"):
            return kernel_path
        if status == "buildable":
            return f"{kernel_path} (after its first build)"
        return f"{fallback} (fallback: {extensions[name]['detail']})"

    field = "grid" if not cuda else ("hash (tcnn)" if tcnn else "hash (torch)")
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "auto_device": str(device),
        "cuda_devices": devices,
        "nvcc": kernels.nvcc(),
        "nvcc_on_path": kernels.nvcc_on_path(),
        "python_h": str(kernels.python_header()) if kernels.python_header().is_file() else None,
        "extensions_folder": str(kernels.extensions_root()),
        "extensions": extensions,
        "tinycudann": {"installed": tcnn,
                       "detail": "importable" if tcnn else "not installed (the PyTorch hash grid is used on CUDA)"},
        "backends": {"nerf": {"field": field, "sampler": pick("nerfacc", "occgrid", "dense")},
                     "gaussians": {"rasteriser": pick("gsplat", "gsplat", "pytorch"), "densify": "default"},
                     "surfels": {"rasteriser": pick("gsplat", "gsplat (2DGS)", "pytorch (2DGS twin)")}},
    }


def format_report(info: dict) -> str:
    lines = [f"torch          {info['torch']} (CUDA build: {info['torch_cuda'] or 'none'})"]
    if info["cuda_devices"]:
        for d in info["cuda_devices"]:
            lines.append(f"cuda:{d['index']:<9} {d['name']}, {d['memory_gib']} GiB")
    else:
        lines.append("CUDA devices   none (runs use the CPU)")
    lines.append(f"auto device    {info['auto_device']}")
    where = "" if info["nvcc_on_path"] or not info["nvcc"] else " (not on PATH, where nerfacc looks for it: " \
        "threedgen puts its folder on PATH for its builds; add it to yours for other tools)"
    lines.append(f"nvcc           {info['nvcc'] or 'not found'}{where}")
    lines.append(f"Python.h       {info['python_h'] or 'missing (torch cannot build CUDA kernels without this Python headers)'}")
    for name, ext in info["extensions"].items():
        took = f", {ext['build_seconds']} s" if ext.get("build_seconds") is not None else ""
        lines.append(f"{name:<14} {ext['status']}: {ext['detail']}{took}")
    lines.append(f"tiny-cuda-nn   {info['tinycudann']['detail']}")
    b = info["backends"]
    lines.append(f"a NeRF run     field {b['nerf']['field']}, sampler {b['nerf']['sampler']} (nerf and nerf-sdf)")
    lines.append(f"a Gaussian run rasteriser {b['gaussians']['rasteriser']}, densify {b['gaussians']['densify']}")
    lines.append(f"a surfel run   rasteriser {b['surfels']['rasteriser']}")
    return "\n".join(lines)
