"""Adding a representation touches its own file, its preset (if any) and its tests, nothing else:
this file registers a toy representation (a soft ball with a learnable radius and colour) and runs
it through the CLI for 3 steps, to the exported mesh and the eval, without any other file knowing it.

It is also the smallest complete example of the Representation contract (docs/architecture.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from threedgen.cli import main
from threedgen.errors import check_range
from threedgen.meshing import surface_from_field
from threedgen.representations.base import RenderOutput, Representation
from threedgen.representations.config import REPRESENTATIONS, RepresentationConfig


@dataclass
class BallConfig(RepresentationConfig):
    name: str = "toy-ball"
    radius: float = 0.3
    """Initial radius of the ball, world units."""
    lr: float = 0.05
    """Learning rate of the radius and the colour."""

    def check(self) -> None:
        super().check()
        check_range("representation.radius", self.radius, 1e-3, self.bound)


class Ball(Representation):
    def __init__(self, cfg: BallConfig, device="cpu"):
        super().__init__()
        self.cfg = cfg
        self.log_radius = torch.nn.Parameter(torch.tensor(float(cfg.radius), device=device).log())
        self.color_logits = torch.nn.Parameter(torch.zeros(3, device=device))

    def density(self, points: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(40.0 * (self.log_radius.exp() - points.norm(dim=-1)))

    def color(self, points: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.color_logits).expand(points.shape[0], 3)

    def render(self, cameras, height: int, width: int) -> RenderOutput:
        origins, dirs = cameras.rays(height, width)
        along = -(origins * dirs).sum(-1, keepdim=True)  # distance to the point nearest the centre
        nearest = (origins + along * dirs).norm(dim=-1, keepdim=True)
        alpha = torch.sigmoid(40.0 * (self.log_radius.exp() - nearest)) * (along > 0)
        rgb = torch.sigmoid(self.color_logits) * alpha + cameras.background[:, None, None, :] * (1 - alpha)
        return RenderOutput(rgb=rgb, alpha=alpha, depth=along * alpha)

    def parameter_groups(self) -> list[dict]:
        return [{"params": [self.log_radius, self.color_logits], "lr": self.cfg.lr, "name": "ball"}]

    def extract_surface(self, resolution: int = 128):
        return surface_from_field(self.density, self.color, self.cfg.bound, resolution, 0.5,
                                  device=self.log_radius.device)


@pytest.fixture
def ball():
    REPRESENTATIONS.register("toy-ball", Ball, "a soft ball (a test's toy)")(BallConfig)
    yield
    REPRESENTATIONS.unregister("toy-ball")


def test_a_registered_representation_runs_through_the_cli(ball, tmp_path, capsys):
    code = main(["run", "--prompt", "a red sphere", "--representation", "toy-ball", "--steps", "3", "--no-progress",
                 "--out", str(tmp_path), "export.resolution=32", "export.video_frames=2", "export.faces=0",
                 "representation.radius=0.4", "export.texture=vertex"])
    out = capsys.readouterr()
    assert code == 0, out.err
    run_dir = tmp_path / out.out.strip().splitlines()[-1].split("/")[-1]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "succeeded" and status["step"] == 3
    assert "radius: 0.4" in (run_dir / "config.yaml").read_text()  # its own key, from the command line
    assert (run_dir / "mesh.glb").stat().st_size > 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.6 < metrics["mask_iou"] <= 1.0  # a ball of radius ~0.4 against the truth sphere of 0.45
    # listed wherever representations are listed, from the registry
    assert main(["config", "keys", "--representation", "toy-ball"]) == 0
    assert "representation.radius = 0.3\n    Initial radius of the ball" in capsys.readouterr().out


def test_an_unregistered_name_is_a_one_line_error(capsys):
    assert main(["run", "--prompt", "a red sphere", "--representation", "toy-ball"]) == 2
    assert "unknown representation 'toy-ball'; valid: " in capsys.readouterr().err
