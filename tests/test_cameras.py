import torch

from threedgen.cameras import Cameras, CameraSampler, CameraSamplerConfig, view_tag


def test_look_at_conventions():
    cams = Cameras.from_angles([0.0, 0.0, 90.0], [0.0, 90.0, 0.0], 2.0, 40.0)
    eye = cams.c2w[:, :3, 3]
    torch.testing.assert_close(eye[0], torch.tensor([0.0, 0.0, 2.0]), atol=1e-6, rtol=0)  # azimuth 0: +Z (front)
    torch.testing.assert_close(eye[1], torch.tensor([2.0, 0.0, 0.0]), atol=1e-6, rtol=0)  # azimuth 90: +X
    torch.testing.assert_close(eye[2], torch.tensor([0.0, 2.0, 0.0]), atol=1e-6, rtol=0)  # straight above
    rot = cams.c2w[:, :3, :3]
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3).expand(3, 3, 3), atol=1e-6, rtol=0)
    assert torch.allclose(torch.det(rot), torch.ones(3))
    # The centre ray of an even image passes (almost) through the origin; -Z_cam looks at it.
    o, d = cams.rays(2, 2)
    centre = d.mean(dim=(1, 2))
    centre = centre / centre.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(centre, -eye / eye.norm(dim=-1, keepdim=True), atol=1e-6, rtol=0)
    # Image up is world up for a level camera: the top row's rays point higher.
    o, d = cams[:1].rays(4, 4)
    assert d[0, 0, :, 1].mean() > d[0, -1, :, 1].mean()


def test_view_tags():
    assert view_tag(10, 0) == "front" and view_tag(10, 180) == "back" and view_tag(10, -170) == "back"
    assert view_tag(10, 90) == "side" and view_tag(70, 0) == "overhead"


def test_sampler_ranges_backgrounds_and_reproducibility():
    cfg = CameraSamplerConfig(batch_size=4, elevation_range=(-10, 65), random_background_prob=0.5)
    sampler = CameraSampler(cfg, seed=3)
    batches = [sampler.sample(i) for i in range(200)]
    el = torch.cat([b.elevation for b in batches])
    assert el.min() >= -10 and el.max() <= 65 and el.max() - el.min() > 60
    az = torch.cat([b.azimuth for b in batches])
    assert az.min() < -150 and az.max() > 150
    white = torch.cat([(b.background == 1).all(1) for b in batches]).float().mean()
    assert 0.35 < white < 0.65
    again = CameraSampler(cfg, seed=3).sample(17)
    assert torch.equal(again.c2w, batches[17].c2w) and torch.equal(again.background, batches[17].background)
