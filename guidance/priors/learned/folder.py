"""Checks of a learned shapes-teacher folder, torch-free and before anything is loaded: the shipped
weights' place, ``threedgen.json`` (camera convention, SHA-256 of every weight file) and that the
UNet's camera input agrees with it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from threedgen.errors import UserError

SHIPPED = Path(__file__).resolve().parent / "weights" / "shapes-unet"
REBUILD = ("reinstall threedgen (pip install --force-reinstall threedgen), or rebuild the weights with "
           "`threedgen train-prior --export {folder}` (about 50 minutes on 2 CPU cores)")
_verified: dict[tuple, dict] = {}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_meta(folder: str | Path) -> dict:
    """``threedgen.json`` of a learned shapes-teacher folder, with every weight file checked against
    its recorded SHA-256 and the camera settings checked against the UNet's config; one-line
    errors naming the file and how to rebuild it."""
    folder = Path(folder)
    rebuild = REBUILD.format(folder=folder)
    meta_path = folder / "threedgen.json"
    try:
        meta = json.loads(meta_path.read_text())
        hashes = meta["sha256"]
    except FileNotFoundError:
        raise UserError(f"{meta_path} is missing: not a threedgen shapes-teacher folder; {rebuild}") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{meta_path} is damaged; {rebuild}") from None
    stamp = tuple((name, _stat(folder / name)) for name in sorted(hashes))
    key = (str(folder.resolve()), stamp)
    if key in _verified:
        return _verified[key]
    for name, digest in sorted(hashes.items()):
        path = folder / name
        if not path.is_file():
            raise UserError(f"weight file {path} is missing; {rebuild}")
        if sha256(path) != digest:
            raise UserError(f"weight file {path} is damaged (its SHA-256 differs from threedgen.json); {rebuild}")
    try:
        unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{folder / 'unet' / 'config.json'} is missing or damaged; {rebuild}") from None
    unet_camera = unet_cfg.get("class_embed_type") == "projection"
    camera = meta.get("camera")
    if unet_camera and not camera:
        raise UserError(f"model {str(folder)!r}: its UNet takes a camera input but threedgen.json has no camera "
                        "settings; the folder is inconsistent; " + rebuild)
    if camera and not unet_camera:
        raise UserError(f"model {str(folder)!r}: threedgen.json has camera settings but its UNet takes no camera "
                        "input; the folder is inconsistent; " + rebuild)
    if camera and (camera.get("input") != "c2w" or int(camera.get("dim", 0)) != int(unet_cfg.get(
            "projection_class_embeddings_input_dim") or 0)):
        raise UserError(f"model {str(folder)!r}: unsupported camera settings {camera}; threedgen knows "
                        "{'input': 'c2w', 'dim': 16}")
    _verified[key] = meta
    return meta


def _stat(path: Path) -> tuple:
    try:
        st = path.stat()
        return (st.st_size, st.st_mtime_ns)
    except OSError:
        return (None, None)
