"""Web UI latency: seconds from a `/submit` call to a downloadable GLB, through `gradio_client`
against an in-process `threedgen webui` with default settings (the preset's 600 steps, export and eval).

    python benchmarks/webui_latency.py [--prompt "a red cube"] [--representation nerf] [--repeats 1]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from pathlib import Path

from threedgen.webui.app import Settings, WebUI


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default="a red cube")
    ap.add_argument("--representation", default="nerf", choices=["nerf", "gaussians"])
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    from gradio_client import Client

    root = Path(tempfile.mkdtemp(prefix="threedgen-webui-bench-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = WebUI(Settings(outputs=root / "outputs", state=root / "state"))
    demo = ui.launch(port=port, block=False)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    times = []
    try:
        for _ in range(args.repeats):
            start = time.perf_counter()
            (job,) = client.predict(args.prompt, "", "sds", args.representation, "shapes", 600, "0", "",
                                    api_name="/submit")["jobs"]
            while (st := client.predict(job, api_name="/status"))["status"] in ("queued", "running"):
                time.sleep(0.5)
            assert st["status"] == "succeeded", st
            client.predict(job, "glb", api_name="/download")
            times.append(time.perf_counter() - start)
            print(f"{args.prompt!r} ({args.representation}): submit to GLB {times[-1]:.1f} s", flush=True)
    finally:
        ui.close(demo)
    print(f"median {statistics.median(times):.1f} s over {len(times)} run(s)")


if __name__ == "__main__":
    main()
