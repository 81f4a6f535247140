import math

import numpy as np
import pytest
import torch

from threedgen.cameras import Cameras
from threedgen.errors import UserError
from threedgen.representations.config import NeRFConfig
from threedgen.representations.nerf import NeRF, ray_aabb


def _cams(n=2, bg=(1.0, 1.0, 1.0)):
    return Cameras.from_angles([20.0] * n, [0.0, 90.0][:n], 2.5, 40.0, bg)


def test_render_shapes_ranges_and_gradients():
    nerf = NeRF(NeRFConfig(bound=0.75))
    out = nerf.render(_cams(), 16, 12)
    assert out.rgb.shape == (2, 16, 12, 3) and out.alpha.shape == (2, 16, 12, 1) and out.depth.shape == (2, 16, 12, 1)
    assert out.alpha.min() >= 0 and out.alpha.max() <= 1 + 1e-5
    assert out.alpha.max() > 0.5  # the density blob is visible
    (out.rgb.sum() + out.alpha.sum()).backward()
    for name, p in nerf.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_empty_field_shows_the_background():
    nerf = NeRF(NeRFConfig(bound=0.75, density_blob_scale=0.0))
    with torch.no_grad():
        nerf.field.density.fill_(-30.0)
    bg = torch.tensor([[0.2, 0.4, 0.6]])
    out = nerf.render(_cams(1, bg), 8, 8)
    torch.testing.assert_close(out.rgb, bg.view(1, 1, 1, 3).expand(1, 8, 8, 3), atol=1e-5, rtol=0)


def test_volume_rendering_matches_the_quadrature():
    # Constant density sigma and colour c inside the box: alpha = 1 - exp(-sigma * chord).
    nerf = NeRF(NeRFConfig(bound=0.5, density_blob_scale=0.0, num_samples=64)).eval()
    sigma = 3.0
    with torch.no_grad():
        nerf.field.density.fill_(math.log(math.expm1(sigma)))  # softplus^-1
        nerf.field.color.fill_(0.0)  # sigmoid(0) = 0.5
    cams = Cameras.from_angles([0.0], [0.0], 2.0, 10.0, (0.0, 0.0, 0.0))
    out = nerf.render(cams, 1, 1)  # a ray along -Z through the origin: chord 1.0
    expected = 1 - math.exp(-sigma * 1.0)
    assert out.alpha.item() == pytest.approx(expected, rel=1e-4)
    assert out.rgb[0, 0, 0, 0].item() == pytest.approx(0.5 * expected, rel=1e-4)


def test_ray_aabb():
    o = torch.tensor([[0.0, 0.0, 3.0], [0.0, 5.0, 3.0]])
    d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    near, far = ray_aabb(o, d, 1.0)
    assert near[0].item() == pytest.approx(2.0) and far[0].item() == pytest.approx(4.0)
    assert near[1] == far[1]  # a miss


def test_hash_grid_field_renders_and_learns_on_cpu():
    nerf = NeRF(NeRFConfig(field="hash", bound=0.75, hash_levels=4, hash_log2_table=12, num_samples=8))
    assert nerf.field_kind == "hash" and nerf.field.tcnn is None
    out = nerf.render(_cams(1), 8, 8)
    out.rgb.mean().backward()
    assert nerf.field.encoding.table.grad.abs().sum() > 0
    names = {g["name"] for g in nerf.parameter_groups()}
    assert names == {"encoding", "mlp"}


def test_defaults_by_device_and_cuda_only_sampler():
    nerf = NeRF(NeRFConfig())
    assert nerf.field_kind == "grid" and nerf.sampler_kind == "dense"
    with pytest.raises(UserError, match="occgrid needs CUDA"):
        NeRF(NeRFConfig(sampler="occgrid"))
    with pytest.raises(UserError, match="field"):
        NeRFConfig(field="triplane").check()  # a config is checked once, with the run's (config.merge)


@pytest.mark.cuda
def test_cuda_occgrid_matches_dense_path():  # pragma: no cover - GPU only
    dense = NeRF(NeRFConfig(bound=0.75, field="grid", sampler="dense", num_samples=512), "cuda").cuda().eval()
    occ = NeRF(NeRFConfig(bound=0.75, field="grid", sampler="occgrid", render_step_size=0.002), "cuda").cuda()
    occ.load_state_dict(dense.state_dict(), strict=False)
    occ.train()  # nerfacc updates its grid only in training mode
    for step in range(300):
        occ.on_step(step)
    occ.eval()
    cams = _cams().to("cuda")
    a, b = dense.render(cams, 32, 32), occ.render(cams, 32, 32)
    # The grid skips cells below nerfacc's occupancy threshold (0.01 opacity per step): the blob's
    # soft shell. A CPU emulation of this very test measured a mean |delta alpha| of 0.023 for that
    # reason alone (0.0005 without skipping); 0.03 leaves room for it and still catches a wrong march.
    assert (a.alpha - b.alpha).abs().mean() < 0.03


def _grid_nerf(solid):
    """A dense-grid NeRF whose raw density is 8 where ``solid(x, y, z)`` holds and -20 elsewhere."""
    nerf = NeRF(NeRFConfig(bound=0.75, density_blob_scale=0.0, density_resolution=64))
    lin = torch.linspace(-0.75, 0.75, 64)
    zz, yy, xx = torch.meshgrid(lin, lin, lin, indexing="ij")
    with torch.no_grad():
        nerf.field.density.copy_(torch.where(solid(xx, yy, zz), 8.0, -20.0)[None])
    return nerf


def _radius(x, y, z, cx=0.0, cy=0.0, cz=0.0):
    return torch.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)


def test_extract_mesh_of_a_sphere_has_the_right_radius_and_colours():
    nerf = _grid_nerf(lambda x, y, z: _radius(x, y, z) < 0.5)
    with torch.no_grad():
        nerf.field.color[0].fill_(3.0)  # red
        nerf.field.color[1:].fill_(-3.0)
    mesh = nerf.extract_surface(96).colored_mesh()
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(np.median(radii) - 0.5) < 0.03
    assert mesh.is_watertight and mesh.volume > 0  # outward normals
    rgb = mesh.visual.vertex_colors[:, :3].astype(int)
    assert (rgb[:, 0] > 200).all() and (rgb[:, 1] < 30).all()


def test_extract_mesh_fills_enclosed_cavities():
    # A thick shell (density only where 0.3 < r < 0.5) must export as one outer surface.
    nerf = _grid_nerf(lambda x, y, z: (_radius(x, y, z) < 0.5) & (_radius(x, y, z) > 0.3))
    mesh = nerf.extract_surface(96).colored_mesh()
    assert len(mesh.split(only_watertight=False)) == 1
    assert np.linalg.norm(mesh.vertices, axis=1).min() > 0.45


def test_extract_mesh_drops_small_floaters_and_rejects_bad_fields():
    nerf = _grid_nerf(lambda x, y, z: (_radius(x, y, z) < 0.4) | (_radius(x, y, z, 0.6, 0.6, 0.6) < 0.04))
    mesh = nerf.extract_surface(96).colored_mesh()
    assert len(mesh.split(only_watertight=False)) == 1
    assert np.abs(mesh.vertices).max() < 0.45
    with torch.no_grad():
        nerf.field.density.fill_(-20.0)
    with pytest.raises(UserError, match="empty"):
        nerf.extract_surface(32).colored_mesh()
    with torch.no_grad():
        nerf.field.density[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError, match="non-finite"):
        nerf.extract_surface(32).colored_mesh()


def _ball_nerf(skip: bool, radius: float = 0.3) -> NeRF:
    """A NeRF holding a dense ball of the given radius (sigma 50 inside, ~0 outside)."""
    nerf = NeRF(NeRFConfig(bound=0.75, density_blob_scale=0.0, num_samples=48, skip_empty=skip))
    r = nerf.cfg.density_resolution
    ax = torch.linspace(-0.75, 0.75, r)
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")  # grid_sample's [D,H,W] = (z, y, x)
    inside = (x ** 2 + y ** 2 + z ** 2).sqrt() < radius
    with torch.no_grad():
        nerf.field.density.copy_(torch.where(inside, 50.0, -30.0)[None])
    return nerf


def test_empty_space_skipping_renders_the_same_image_from_fewer_field_evaluations():
    cams = _cams(2, (0.2, 0.4, 0.6))
    images, evaluated = {}, {}
    for skip in (False, True):
        nerf = _ball_nerf(skip).eval()
        calls = []
        forward = nerf.field.forward
        nerf.field.forward = lambda p, f=forward: (calls.append(len(p)), f(p))[1]
        with torch.no_grad():
            images[skip] = nerf.render(cams, 32, 32)
        evaluated[skip] = sum(calls) - (nerf.cfg.skip_grid ** 3 if skip else 0)  # minus the grid's own build
    assert evaluated[True] < 0.25 * evaluated[False]  # the ball fills ~6% of the box
    torch.testing.assert_close(images[True].rgb, images[False].rgb, atol=2e-3, rtol=0)
    torch.testing.assert_close(images[True].alpha, images[False].alpha, atol=2e-3, rtol=0)
    assert images[True].alpha.max() > 0.99 and images[True].alpha.min() < 1e-3


def test_empty_space_grid_marks_the_ball_dilated_and_travels_in_the_state_dict():
    nerf = _ball_nerf(True)
    grid = nerf.empty_grid
    grid.update(nerf.density, jitter=False)
    res, cell = grid.res, 1.5 / grid.res
    centres = ((torch.arange(res) + 0.5) * cell - 0.75)
    occ = grid.occupied.view(res, res, res)
    dist = (centres[:, None, None] ** 2 + centres[None, :, None] ** 2 + centres[None, None, :] ** 2).sqrt()
    assert occ[dist < 0.3 - cell].all()  # inside the ball
    assert not occ[dist > 0.3 + 2 * cell].any()  # beyond the ball plus the one-cell dilation
    assert occ[(dist > 0.3 + 0.2 * cell) & (dist < 0.3 + 0.8 * cell)].all()  # the dilation ring
    # Training steps refresh it every skip_every steps; loading weights marks it stale.
    assert grid.fresh
    nerf.load_state_dict(_ball_nerf(True, radius=0.5).state_dict())
    assert not grid.fresh
    nerf.eval().render(_cams(1), 8, 8)
    assert grid.fresh and grid.occupied.view(res, res, res)[dist < 0.5 - cell].all()
    # A built grid travels in the state dict (a resumed run skips what the stopped run skipped) ...
    other = _ball_nerf(True)
    other.load_state_dict(nerf.state_dict())
    assert other.empty_grid.fresh and torch.equal(other.empty_grid.occupied, grid.occupied)
    assert torch.equal(other.empty_grid.box, grid.box)
    # ... and a state dict from before it was saved (no grid keys) still loads, then rebuilds.
    old = {k: v for k, v in nerf.state_dict().items() if not k.startswith("empty_grid.")}
    assert len(old) == len(nerf.state_dict()) - 2
    other.load_state_dict(old)
    assert not other.empty_grid.fresh
