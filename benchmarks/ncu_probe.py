"""The planner's retrieval and fused GEMM at ViT-B/16 sizes, launched a few times: a target for
Nsight Compute on the GPU machine (no timing here; ncu measures)::

    ncu --clock-control none -k regex:_mira_ -c 12 --section SpeedOfLight --section WarpStateStats \
        python3 -m benchmarks.ncu_probe

The inputs and plans are ``benchmarks.gpu_sweep``'s (the op phase's seeded ViT-B/16 qkv workload,
query = x[:, 0]); each batch's two launches run twice (the first compiles), bf16 unless
``--dtype`` says otherwise.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks import gpu_sweep

    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.ncu_probe", description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu with TRITON_INTERPRET=1 and --tiny: a test")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU test)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    workload = gpu_sweep._workload(args.tiny)
    with torch.no_grad():
        for batch in (int(b) for b in args.batches.split(",")):
            case = gpu_sweep.make_case(workload, args.dtype, batch, device)
            _, launches, _ = gpu_sweep.plan(case)
            for _ in range(args.repeats):
                for launch in launches:
                    launch.run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            print(f"{args.dtype} B={batch}: " + ", ".join(f"{launch.name} grid={tuple(launch.grid)}"
                                                          for launch in launches), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
