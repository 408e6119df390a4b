"""The two ceilings every GPU figure is measured against: device-to-device copy bandwidth (bytes
read plus written per second) and the rate of a large bf16 matmul. Prints JSON."""

import json
import sys

import torch
from triton.testing import do_bench


def main() -> int:
    if not torch.cuda.is_available():
        print("ceilings.py needs a CUDA device", file=sys.stderr)
        return 1
    buffers = [torch.empty(2**30, dtype=torch.uint8, device="cuda") for _ in range(2)]
    copy_s = do_bench(lambda: buffers[1].copy_(buffers[0]), return_mode="median") / 1e3
    buffers.clear()  # free the 2 GiB before the matmul
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_s = do_bench(lambda: a @ b, return_mode="median") / 1e3
    result = {
        "device": torch.cuda.get_device_name(),
        "copy_GBps": round(2 * 2**30 / copy_s / 1e9, 1),
        "bf16_matmul_TFLOPs": round(2 * n**3 / mm_s / 1e12, 1),
        "how": "do_bench median: 1 GiB device copy (read + write); 8192^3 bf16 matmul",
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
