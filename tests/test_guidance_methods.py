"""Every guidance method: the gradient on a fixed input equals the method's formula, computed
independently here (float64, own DDIM arithmetic) on a mock prior with known predictions, with the
random draws replayed in the method's documented order."""

import math

import pytest
import torch
from mock_prior import MockPrior

from threedgen.cameras import Cameras
from threedgen.errors import UserError
from threedgen.guidance import GUIDANCE

SEED = 7
K = MockPrior.COEFS


def e(which, x_t, t):
    """The mock prior's eps, in float64: k x_t + b + t / 1000."""
    k, b = K[which]
    return k * x_t + b + t.view(-1, 1, 1, 1).double() / 1000


def randn_like_render(images):
    """``torch.randn_like`` of the prior input as the methods build it (a permuted view keeps
    the render's memory layout, and randn_like fills memory in that order)."""
    return torch.randn_like((images.detach() * 2 - 1).permute(0, 3, 1, 2))


def abar(prior, t):
    return prior.alphas_cumprod.double()[t].view(-1, 1, 1, 1)


def noised(prior, x, t, eps):
    a = abar(prior, t)
    return a.sqrt() * x + (1 - a).sqrt() * eps


def cfg_eps(x_t, t, s):
    return e("uncond", x_t, t) + s * (e("cond", x_t, t) - e("uncond", x_t, t))


def ddim(prior, x, eps, k_from, k_to):
    a0, a1 = prior.alphas_cumprod.double()[k_from], prior.alphas_cumprod.double()[k_to]
    return a1.sqrt() * (x - (1 - a0).sqrt() * eps) / a0.sqrt() + (1 - a1).sqrt() * eps


def run(name, images, cams, step=0, max_steps=100, seed=SEED, **cfg_kw):
    prior = MockPrior()
    cfg = GUIDANCE[name].config(**cfg_kw)
    method = GUIDANCE[name].cls(cfg, prior)
    torch.manual_seed(seed)
    out = method(images, prior.encode_prompt("p"), cams, step, max_steps)
    (grad_rgb,) = torch.autograd.grad(out.loss, images)
    # x = 2 rgb - 1 and d loss / d x = g / B  =>  d loss / d rgb = 2 g / B
    g = (grad_rgb * images.shape[0] / 2).permute(0, 3, 1, 2).double()
    return g, out, prior, method, cfg


@pytest.fixture
def inputs():
    torch.manual_seed(0)
    images = torch.rand(2, 8, 8, 3).requires_grad_(True)
    cams = Cameras.from_angles([10.0, 30.0], [0.0, 120.0], 2.5, 40.0)
    x = (images.detach() * 2 - 1).permute(0, 3, 1, 2).double()
    return images, cams, x


def test_asd_gradient(inputs):
    images, cams, x = inputs
    g, out, prior, method, cfg = run("asd", images, cams, step=30, max_steps=100)
    torch.manual_seed(SEED)
    lo, hi = method.step_range(30, 100)
    assert abs(lo - 1000 * (0.5 - 0.48 * 0.3)) <= 1 and abs(hi - 1000 * (0.98 - 0.48 * 0.3)) <= 1  # annealed
    t = torch.randint(lo, hi + 1, (2,))
    eps = randn_like_render(images).double()
    u = torch.rand(2)
    dt = (u * torch.minimum(0.1 * (t - lo).float(), (999 - t).float())).floor().long()
    t2 = (t + dt).clamp(1, 999)
    assert torch.equal(out.t, t) and (t2 >= t).all()
    expected = (1 - abar(prior, t)) * (cfg_eps(noised(prior, x, t, eps), t, 7.5) - e("cond", noised(prior, x, t2, eps), t2))
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)
    assert prior.calls == 1  # cond, uncond and cond at t + dt in one call


def replay_flip(x, seed=SEED, p=0.5):
    """The methods' first draw: one coin per batch, ``rand() < flip_prob``; a flipped batch is the
    render mirrored left-right (the last axis of ``x [B,C,H,W]``)."""
    torch.manual_seed(seed)
    flipped = bool(torch.rand(()) < p)
    return flipped, (x.flip(-1) if flipped else x)


def _tsm_expected(prior, images, x, cfg, step, max_steps, method, seed=SEED):
    """The official rule with steps_offset o = 1: t ~ U{lo+1..hi}, s = max(t - dT, 1), x~_0 at t = 1,
    one offset-noise constant per channel for the whole batch; computed on the (maybe) mirrored
    render and mirrored back."""
    flipped, x = replay_flip(x, seed)
    lo, hi = method.step_range(step, max_steps)
    t = torch.randint(lo + 1, hi + 1, (1,)).expand(2)
    eps = randn_like_render(images).double() + cfg.noise_offset * torch.randn(1, 3, 1, 1).double()
    k_t = int(t[0])
    d = cfg.interval[1] + (cfg.interval[2] - cfg.interval[1]) * min(step / (cfg.interval[3] * max_steps), 1.0)
    k_s = max(k_t - int(d), 1)
    x_cur = noised(prior, x, torch.ones(2, dtype=torch.long), eps)
    k = 1
    calls = 0
    while k < k_s:  # inversion with the empty prompt, strides of 200
        nxt = min(k + 200, k_s)
        x_cur = ddim(prior, x_cur, e("empty", x_cur, torch.full((2,), k)), k, nxt)
        k, calls = nxt, calls + 1
    e_s = e("empty", x_cur, torch.full((2,), k_s))
    x_t = ddim(prior, x_cur, e_s, k_s, k_t)
    k_mu = round(k_s + math.sqrt(1 - cfg.gamma ** 2) * (k_t - k_s))
    target = e_s if k_mu == k_s else e("empty", ddim(prior, x_cur, e_s, k_s, k_mu), torch.full((2,), k_mu))
    a = abar(prior, t)
    g = ((1 - a) / a).sqrt() * (cfg_eps(x_t, t, cfg.guidance_scale) - target) * cfg.grad_scale
    return (g.flip(-1) if flipped else g), t, calls


@pytest.mark.parametrize("name, step, seed", [("tsm", 0, SEED), ("tsm", 25, 3), ("ism", 10, SEED), ("ism", 60, 3)])
def test_tsm_and_ism_gradient_with_inversion(inputs, name, step, seed):
    images, cams, x = inputs
    g, out, prior, method, cfg = run(name, images, cams, step=step, max_steps=100, seed=seed)
    expected, t, inversion_calls = _tsm_expected(prior, images, x, cfg, step, 100, method, seed)
    assert out.extras["flipped"] == float(seed == 3)  # seed 3's first rand() is below 0.5, SEED's is not
    assert torch.equal(out.t, t)
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)
    # inversion steps, the e_0(x~_s, s) call, then one batched CFG (+ target) call
    assert prior.calls == inversion_calls + 2
    assert out.extras["inversion_calls"] == inversion_calls + 1


def test_tsm_with_gamma_one_is_ism(inputs):
    images, cams, _ = inputs
    g_tsm = run("tsm", images, cams, step=10, gamma=1.0)[0]
    g_ism = run("ism", images, cams, step=10)[0]
    assert torch.equal(g_tsm, g_ism)
    g_tsm_03 = run("tsm", images, cams, step=10, gamma=0.3)[0]
    assert not torch.allclose(g_tsm_03, g_ism)


def test_pixel_gradient_clipping_caps_each_pixel():
    from threedgen.guidance.tsm import clip_pixel_gradient

    grad = torch.tensor([[[[0.2, -0.1, 0.05], [0.01, 0.02, -0.03]]]])
    clipped = clip_pixel_gradient(grad, 0.05)
    torch.testing.assert_close(clipped[0, 0, 0], torch.tensor([0.05, -0.025, 0.0125]))  # direction kept
    torch.testing.assert_close(clipped[0, 0, 1], grad[0, 0, 1])  # already under the limit


def test_bsd_gradient_is_the_min_norm_combination(inputs):
    images, cams, x = inputs
    g, out, prior, method, cfg = run("bsd", images, cams, step=0)
    flipped, x = replay_flip(x)
    lo, hi = method.step_range(0, 100)
    t = torch.randint(lo + 1, hi + 1, (1,)).expand(2)  # steps_offset 1
    eps = randn_like_render(images).double() + 0.1 * torch.randn(1, 3, 1, 1).double()
    x_t = noised(prior, x, t, eps)
    c = 15.0 * (e("cond", x_t, t) - e("uncond", x_t, t))
    d = e("uncond", x_t, t)
    expected = []
    for i in range(2):  # the min-norm point of the segment [c, d], by brute force on a fine grid
        grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
        norms = torch.stack([(a * c[i] + (1 - a) * d[i]).norm() for a in grid[::100]])
        coarse = grid[::100][norms.argmin()]
        fine = grid[(grid - coarse).abs() <= 0.01]
        best = fine[torch.stack([(a * c[i] + (1 - a) * d[i]).norm() for a in fine]).argmin()]
        expected.append(abar(prior, t)[i].sqrt() * (best * c[i] + (1 - best) * d[i]))
    expected = torch.stack(expected)
    torch.testing.assert_close(g, expected.flip(-1) if flipped else expected, rtol=2e-3, atol=1e-4)
    assert prior.calls == 1


@pytest.mark.parametrize("normalize", [False, True])
def test_csm_gradient_is_the_classifier_term_on_a_deterministic_x_t(inputs, normalize):
    images, cams, x = inputs
    g, out, prior, method, cfg = run("csm", images, cams, step=0, normalize=normalize)
    torch.manual_seed(SEED)
    lo, hi = method.step_range(0, 100)
    t = torch.randint(lo, hi + 1, (1,)).expand(2)
    k_t = int(t[0])
    x_cur, k = x.clone(), 0
    while k < k_t:
        nxt = min(k + 200, k_t)
        x_cur = ddim(prior, x_cur, e("empty", x_cur, torch.full((2,), k)), k, nxt)
        k = nxt
    expected = (1 - abar(prior, t)) * 7.5 * (e("cond", x_cur, t) - e("uncond", x_cur, t))
    if normalize:
        expected = expected / expected.norm()
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-7)
    # deterministic: with t pinned, other seeds give the same gradient
    pinned = dict(normalize=normalize, min_step_percent=0.3, max_step_percent=0.3)
    assert torch.equal(run("csm", images, cams, seed=1, **pinned)[0], run("csm", images, cams, seed=2, **pinned)[0])


def _vsd_draws(method, images, b=2):
    torch.manual_seed(SEED)
    lo, hi = method.step_range(0, 100)
    t = torch.randint(lo, hi + 1, (b,))
    t_fake = torch.randint(0, 1000, (b,))
    eps_fake = randn_like_render(images)
    keep = (torch.rand(()) >= method.cfg.camera_dropout).repeat(b)  # one draw for the batch
    eps = randn_like_render(images).double()
    return t, t_fake, eps_fake, keep, eps


@pytest.mark.parametrize("name, lam, dropout", [("vsd", 0.0, 0.1), ("vsd", 0.0, 1.0), ("esd", 0.5, 0.1),
                                                ("esd", 1.0, 0.5)])
def test_vsd_and_esd_gradient_with_a_trained_fake_score(inputs, name, lam, dropout):
    from threedgen.guidance.camera_embedding import camera_input

    images, cams, x = inputs
    prior = MockPrior()
    cfg = GUIDANCE[name].config(camera_dropout=dropout, **({"entropy_weight": lam} if name == "esd" else {}))
    method = GUIDANCE[name].cls(cfg, prior)
    with torch.no_grad():  # a fake score that is not the teacher (as after some training)
        for p in method.fake_score.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(SEED)
    out = method(images, prior.encode_prompt("p"), cams, 0, 100)
    (grad_rgb,) = torch.autograd.grad(out.loss, images, retain_graph=True)
    g = (grad_rgb * 2 / 2).permute(0, 3, 1, 2).double()
    t, t_fake, eps_fake, keep, eps = _vsd_draws(method, images)
    assert torch.equal(out.t, t)
    x_t = noised(prior, x, t, eps)
    cam = camera_input(cams.c2w)
    with torch.no_grad():
        r_cam = method.fake_score.residual(x_t.float(), t, cam).double()
        r_free = method.fake_score.residual(x_t.float(), t, torch.zeros_like(cam)).double()
    e_fake = e("cond", x_t, t) + (1 - lam) * r_cam + lam * r_free
    expected = (1 - abar(prior, t)) * (cfg_eps(x_t, t, 7.5) - e_fake)
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-5)
    # the returned loss also trains the fake score on the detached render: the denoising loss at
    # t', eps' with the camera dropped where keep is False, the teacher term under the same conditioning
    x_fake = noised(prior, x, t_fake, eps_fake.double())
    with torch.no_grad():
        r = method.fake_score.residual(x_fake.float(), t_fake, camera_input(cams.c2w, keep)).double()
    expected_loss = ((e("cond", x_fake, t_fake) + r - eps_fake.double()) ** 2).mean()
    torch.testing.assert_close(out.extras["fake_score_loss"].double(), expected_loss, rtol=1e-4, atol=1e-6)
    fake_params = [p for p in method.fake_score.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, fake_params, allow_unused=True)
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)
    # one batched call (CFG + the camera rows of the training sample); camera-free rows
    # (dropped training rows, ESD's free branch) need the view-marginal teacher: one more call
    assert prior.calls == 1 + int(bool(lam) or not bool(keep.all()))


def test_untrained_fake_score_starts_as_the_teacher(inputs):
    images, cams, x = inputs
    g, out, prior, method, cfg = run("vsd", images, cams)
    t, _, _, _, eps = _vsd_draws(method, images)
    x_t = noised(prior, x, t, eps)
    # e_fake = e_y at init, so VSD's first gradient is w (s - 1)(e_y - e_u)
    expected = (1 - abar(prior, t)) * 6.5 * (e("cond", x_t, t) - e("uncond", x_t, t))
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)


def test_esd_with_zero_entropy_weight_is_vsd(inputs):
    images, cams, _ = inputs
    torch.manual_seed(3)
    g_vsd, out_vsd, _, m_vsd, _ = run("vsd", images, cams)
    torch.manual_seed(3)
    m_state = {k: v.clone() for k, v in m_vsd.fake_score.state_dict().items()}
    prior = MockPrior()
    esd = GUIDANCE["esd"].cls(GUIDANCE["esd"].config(entropy_weight=0.0), prior)
    esd.fake_score.load_state_dict(m_state)
    torch.manual_seed(SEED)
    out = esd(images, prior.encode_prompt("p"), cams, 0, 100)
    assert torch.equal(out.loss, out_vsd.loss)


def test_esd_requires_camera_dropout():
    with pytest.raises(UserError, match="camera_dropout > 0"):
        GUIDANCE["esd"].config(camera_dropout=0.0).check()


def test_fake_score_learns_a_fixed_toy_distribution():
    """Two fixed 'renders' seen from two cameras: the denoising loss of the fake score falls."""
    from threedgen.guidance.camera_embedding import camera_input
    from threedgen.guidance.fake_score import PixelFakeScore

    prior = MockPrior()
    torch.manual_seed(0)
    fake = PixelFakeScore(prior, channels=(16, 32))
    data = torch.rand(2, 3, 8, 8) * 2 - 1
    cams = camera_input(Cameras.from_angles([0.0, 0.0], [0.0, 180.0], 2.5, 40.0).c2w)
    opt = torch.optim.Adam(fake.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        t = torch.randint(0, 1000, (2,))
        eps = torch.randn_like(data)
        x_t = torch.sqrt(prior.alphas_cumprod[t]).view(-1, 1, 1, 1) * data + \
            torch.sqrt(1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1) * eps
        teacher = prior.predict_noise(x_t, t, ["cond", "cond"])
        loss = fake.training_loss(data, t, eps, None, cams, teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < 0.7 * first, (first, last)


def documented_methods() -> list[str]:
    """The methods of docs/guidance.md's summary table, in its order (`tsm`, `ism` share a row)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "guidance.md").read_text()
    table = text[text.index("\n### Summary\n"):].split("\n\n")[1]
    return [name for row in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", row.split("|")[2])]


def test_guidance_list_names_every_method(capsys):
    from threedgen.cli import main

    assert main(["guidance", "list"]) == 0
    out = capsys.readouterr().out
    # Exactly the documented methods, in the documented order: none lost from the registry (a
    # module that stopped registering), none registered without its section in docs/guidance.md;
    # and the shipped ones are all still there (a new method needs no edit here).
    assert GUIDANCE.names() == documented_methods()
    assert {"sds", "vsd", "esd", "asd", "tsm", "ism", "bsd", "csm"} <= set(GUIDANCE)
    for entry in GUIDANCE.entries():
        assert f"\n{entry.name} " in out
        assert entry.summary.split(" (")[0] in out and entry.cost in out


@pytest.mark.parametrize("name", sorted(set(GUIDANCE) - {"sds"}))
def test_every_method_has_a_preset_and_checks_its_settings(name):
    from threedgen.config import build_config, parse_overrides

    cfg = build_config(name, "nerf", "shapes", flags={"prompt": "a red cube"})
    assert cfg.guidance.name == name
    with pytest.raises(UserError, match="guidance.min_step_percent"):
        build_config(name, "nerf", "shapes", parse_overrides(["guidance.min_step_percent=1.5"]), {"prompt": "a red cube"})
