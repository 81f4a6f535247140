"""``threedgen eval``: score a run against the truth of a prior that has one (the shapes prior).

- **mask IoU** at held-out views (elevations and azimuths off the teacher's grid), masks at
  alpha > 0.5. Nothing pins a text-only result's rotation about the vertical axis, so ``mask_iou``
  is taken at the best yaw offset (a 10-degree search refined to 1 degree, on 32x32 renders; the
  score at the yaw found is then taken at 64x64) and ``mask_iou_unaligned`` is reported beside it.
  In the 10-degree search, turns within 0.01 IoU of the best are ties and the smallest wins
  (``YAW_TIE``; the 1-degree refinement then takes its best), and a turn that gains less than that
  over none is not taken: a shape symmetric about +Y is not turned by the renders' noise.
- **PSNR** of the renders over a white background at the same views (aligned and unaligned).
- **Chamfer distance** between the exported mesh (rotated by the best yaw) and the truth mesh:
  mean of the two directed mean nearest-neighbour distances over 20,000 surface samples each,
  divided by the truth's bounding-box diagonal. The exported mesh is scaled back by
  ``export.scale`` first (exports are in metres).
- **What an artist sees** (``threedgen.asset_metrics``, for a truth that has surface normals and
  colours): ``normal_error_deg``, ``texture_color_error``, ``watertight`` with ``open_edges`` and
  ``pinched_edges``, and ``height_error`` (metres), all of the exported file an artist imports
  (``mesh.glb`` first) at the best yaw.

For a truth with a front (``has_front``: the shapes prior's house, mug and head, whose door, badge
and nose are a marker in a reserved colour) it adds the Janus metrics of ``threedgen.janus``
(``front_markers``, ``janus``, ``janus_view_rate``, ``view_mi``, ``back_front_psnr_gap``; that
module's docstring defines them), starting from the best yaw found here.

For every run, truth or not (``janus.enabled``), the prior's own Janus check
(``threedgen.janus_prior``: ``janus_score_prior``, the share of back views the prior calls a
front); a run of a prior without a truth gets that check alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import trimesh
from scipy.spatial import cKDTree

from threedgen.asset_metrics import rotation_y, surface_metrics
from threedgen.cameras import Cameras
from threedgen.errors import UserError
from threedgen.guidance.priors.config import PRIORS
from threedgen.janus import BACK_AZIMUTH, janus_metrics
from threedgen.janus_prior import janus_prior_metrics
from threedgen.rundir import RunFolder, atomic_write_text
from threedgen.runs import load_representation, open_run
from threedgen.views import render_views

HELD_OUT_VIEWS = [(12.5 if k % 2 == 0 else 42.5, 22.5 + 45.0 * k) for k in range(8)]
EVAL_RESOLUTION = 64
SEARCH_RESOLUTION = 32  # the yaw search's renders


# Turns whose mean IoU is within this of the best one's are ties; the smallest of them is taken.
# A shape symmetric about +Y (a sphere, a torus, a cylinder) scores the same at every yaw up to the
# renders' noise (0.001-0.01), and an arbitrary turn would move the truth's fixed lighting across
# the texture an eval compares (a torus's colour error 0.07 unturned, 0.12 at a 41-degree tie).
YAW_TIE = 0.01


def smallest_turn(scores: dict) -> float:
    """The yaw (degrees) of the smallest turn, either way, among those within ``YAW_TIE`` of the
    best score."""
    top = max(scores.values())
    return min((y for y, v in scores.items() if v >= top - YAW_TIE), key=lambda y: abs(((y + 180) % 360) - 180))


def held_out_cameras(distance: float, fovy: float, yaw: float = 0.0) -> Cameras:
    el = [e for e, _ in HELD_OUT_VIEWS]
    az = [a + yaw for _, a in HELD_OUT_VIEWS]
    return Cameras.from_angles(el, az, distance, fovy, (1.0, 1.0, 1.0))


@torch.no_grad()
def _render(representation, cameras: Cameras, size: int):
    rgb, alpha = render_views(representation, cameras, size, chunk=8)
    return rgb.astype(np.float64) / 255.0, alpha


def mask_iou(pred_alpha: np.ndarray, true_alpha: np.ndarray) -> np.ndarray:
    p, t = pred_alpha > 0.5, true_alpha > 0.5
    inter = (p & t).sum(axis=(1, 2))
    union = (p | t).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def psnr(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    mse = ((pred - true) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))


def rotate_y(points: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate points about +Y; +degrees turns +Z towards +X (the azimuth direction)."""
    return points @ rotation_y(degrees).T


def chamfer(pred_mesh, true_mesh, yaw: float = 0.0, n: int = 20000, seed: int = 0) -> float:
    if pred_mesh is None or len(pred_mesh.faces) == 0:
        return float("inf")
    p, _ = trimesh.sample.sample_surface(pred_mesh, n, seed=seed)
    t, _ = trimesh.sample.sample_surface(true_mesh, n, seed=seed + 1)
    p = rotate_y(np.asarray(p), -yaw)  # the prediction, turned back onto the truth
    d_pt, _ = cKDTree(t).query(p)
    d_tp, _ = cKDTree(p).query(t)
    diag = float(np.linalg.norm(true_mesh.bounds[1] - true_mesh.bounds[0]))
    return float((d_pt.mean() + d_tp.mean()) / 2 / diag)


def evaluate_representation(representation, truth, distance: float, fovy: float, mesh=None,
                            size: int = EVAL_RESOLUTION, search_size: int = SEARCH_RESOLUTION,
                            scale: float = 1.0) -> dict:
    """Metrics of a representation against a truth (see the module docstring). The yaw search
    renders at ``search_size`` (a quarter of the pixels); the reported numbers are at ``size``.
    ``mesh`` is the exported mesh in world units, ``scale`` the export's metres per unit."""
    def truth_at(res: int):
        rgb, alpha = truth.render(held_out_cameras(distance, fovy), res, res)
        return rgb.numpy().astype(np.float64), alpha.numpy()

    def scorer(res: int):
        true_rgb, true_alpha = truth_at(res)

        def score(yaw: float):
            rgb, alpha = _render(representation, held_out_cameras(distance, fovy, yaw), res)
            return mask_iou(alpha, true_alpha), psnr(rgb, true_rgb)
        return score

    full = scorer(size)
    search = scorer(search_size) if search_size != size else full
    iou0, psnr0 = full(0.0)
    coarse = {float(yaw): search(float(yaw))[0].mean() for yaw in np.arange(0.0, 360.0, 10.0)}
    best = smallest_turn(coarse)
    fine = {float(best + d): search(float(best + d))[0].mean() for d in range(-5, 6) if d}
    fine[float(best)] = coarse[best]
    yaw = max(fine, key=lambda y: (fine[y], -abs(((y + 180) % 360) - 180)))  # 1-degree steps: the best, not a tie
    iou, ps = full(yaw) if yaw % 360 else (iou0, psnr0)
    if iou0.mean() >= iou.mean() - YAW_TIE:  # no real gain from turning: report the unaligned numbers
        yaw, iou, ps = 0.0, iou0, psnr0
    yaw = float((yaw + 180) % 360 - 180)
    result = {
        "mask_iou": float(iou.mean()),
        "mask_iou_unaligned": float(iou0.mean()),
        "psnr": float(ps.mean()),
        "psnr_unaligned": float(psnr0.mean()),
        "chamfer": chamfer(mesh, truth.mesh(), yaw) if mesh is not None else None,
        "best_yaw_degrees": yaw,
        "views": [{"elevation": e, "azimuth": a, "mask_iou": float(iou[i]), "mask_iou_unaligned": float(iou0[i]),
                   "psnr": float(ps[i]), "psnr_unaligned": float(psnr0[i])}
                  for i, (e, a) in enumerate(HELD_OUT_VIEWS)],
    }
    if mesh is not None and hasattr(truth, "nearest_surface"):
        result.update(surface_metrics(mesh, truth, yaw, scale))
    if getattr(truth, "has_front", False):
        result.update(janus_metrics(representation, truth, distance, fovy, yaw))
    return result


def evaluate_run(run_dir: str | Path, system=None) -> dict:
    """Score a run folder; writes ``metrics.json`` there and returns the metrics."""
    run_dir = Path(run_dir).expanduser().resolve()
    if system is None:
        cfg = open_run(run_dir)[0]
        if not cfg.prior.has_truth:  # say so before loading anything heavy
            if not cfg.janus.enabled:
                raise UserError(f"prior {cfg.prior.name!r} has no ground truth and janus.enabled is false: nothing "
                                "to score (`threedgen eval` scores shapes-prior runs against the truth, any run "
                                "by the prior's Janus check)")
            cfg, representation, run_dir = load_representation(run_dir)
            return prior_check_run(run_dir, cfg, representation)
        cfg, representation, run_dir = load_representation(run_dir)  # the prior is not built
        truth = PRIORS[cfg.prior.name].cls.truth(cfg.prompt)
    else:
        cfg, representation = system.cfg, system.representation
        truth = system.prior.truth(cfg.prompt)
    if truth is None:
        raise UserError(f"prior {cfg.prior.name!r} has no ground truth; `threedgen eval` scores runs of the "
                        "embedded shapes prior only")
    mesh = None
    for path in (RunFolder(run_dir).mesh(f) for f in ("glb", "obj", "ply")):  # the textured file first
        if path.is_file():
            mesh = trimesh.load(path, force="mesh")
            mesh.apply_scale(1.0 / cfg.export.scale)
            break
    if mesh is None:
        raise UserError(f"run {str(run_dir)!r} has no exported mesh; run `threedgen export {run_dir}` first")
    distance = float(np.mean(cfg.camera.distance_range))
    fovy = float(np.mean(cfg.camera.fovy_range))
    metrics = evaluate_representation(representation, truth, distance, fovy, mesh, scale=cfg.export.scale)
    metrics = {"prompt": cfg.prompt, **metrics}
    if cfg.janus.enabled:
        metrics.update(janus_prior_metrics(representation, cfg, prior=system.prior if system is not None else None))
    atomic_write_text(RunFolder(run_dir).metrics, json.dumps(metrics, indent=1))
    return metrics


def prior_check_run(run_dir: Path, cfg, representation, prior=None) -> dict:
    """A run whose prior has no truth: ``metrics.json`` holds the prior's Janus check alone."""
    metrics = {"prompt": cfg.prompt, **janus_prior_metrics(representation, cfg, prior=prior)}
    atomic_write_text(RunFolder(run_dir).metrics, json.dumps(metrics, indent=1))
    return metrics


def format_prior_check(metrics: dict) -> str:
    """The prior's Janus check as one line (empty when the metrics have none)."""
    if "janus_score_prior" not in metrics:
        return ""
    score = metrics["janus_score_prior"]
    if score is None:
        return f"janus_score_prior n/a ({metrics.get('janus_prior_note', 'no judge')})"
    views = metrics.get("janus_views_prior") or []
    back = [v for v in views if abs(v["azimuth"]) >= BACK_AZIMUTH]
    called = ", ".join(f"{v['azimuth']:+.0f}: {v['called']}" for v in back)
    return (f"janus_score_prior {score:.2f} (back views called front by the prior; {called})  "
            f"janus_margin_prior {metrics['janus_margin_prior']:+.3f}")


def format_table(metrics: dict) -> str:
    if "views" not in metrics:  # no truth: the prior's check alone
        return format_prior_check(metrics)
    lines = [f"{'elevation':>9} {'azimuth':>8} {'mask IoU':>9} {'IoU unaligned':>14} {'PSNR':>7}"]
    for v in metrics["views"]:
        lines.append(f"{v['elevation']:9.1f} {v['azimuth']:8.1f} {v['mask_iou']:9.3f} "
                     f"{v['mask_iou_unaligned']:14.3f} {v['psnr']:7.2f}")
    ch = metrics["chamfer"]
    lines.append(f"mask_iou {metrics['mask_iou']:.3f} (best yaw {metrics['best_yaw_degrees']:+.0f} deg)  "
                 f"mask_iou_unaligned {metrics['mask_iou_unaligned']:.3f}  psnr {metrics['psnr']:.2f} dB  "
                 + (f"chamfer {ch:.4f}" if ch is not None else "chamfer n/a"))
    if metrics.get("normal_error_deg") is not None:
        color = metrics["texture_color_error"]
        lines.append(f"normal_error {metrics['normal_error_deg']:.1f} deg  texture_color_error "
                     + (f"{color:.3f}" if color is not None else "n/a")
                     + f"  watertight {'yes' if metrics['watertight'] else 'no'} (open edges {metrics['open_edges']}, "
                     f"pinched edges {metrics['pinched_edges']})  height {metrics['height']:.3f} m "
                     f"({metrics['height_error']:+.3f} m against the truth)")
    if "janus_view_rate" in metrics:
        markers = metrics["front_markers"]
        sizes = "+".join(str(v) for v in metrics.get("front_marker_voxels") or []) or "none"
        lines.append((f"front_markers {markers} (janus {'yes' if metrics['janus'] else 'no'}; voxels {sizes})  "
                      if markers is not None else "front_markers n/a  ")
                     + f"janus_view_rate {metrics['janus_view_rate']:.2f}  view_mi {metrics['view_mi']:.3f} "
                     f"(truth {metrics['view_mi_truth']:.3f})  back_front_psnr_gap "
                     f"{metrics['back_front_psnr_gap']:+.2f} dB")
    if format_prior_check(metrics):
        lines.append(format_prior_check(metrics))
    return "\n".join(lines)
