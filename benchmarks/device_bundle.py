"""Pack what benchmarks/gpu_scoring.py needs on the lent H200 into parts that travel one device call each.

    python benchmarks/device_bundle.py [--dir .dev] [--part-mib 60]

That machine (Python 3.12, torch, transformers, pyarrow, pandas, numba already there; no internet) lacks Ray,
gguf, jsonschema (a Ray dependency) and the SmolLM2 GGUF file. The Ray wheel (about 79 MB) and the GGUF
file (about 98 MB) each exceed the 64 MiB one call may carry, so this script downloads the wheels for
cp312/manylinux, tars them with the GGUF file and splits the tar into parts of at most ``--part-mib``.
It prints the device calls to make: each part travels in its own call (``carry``), which copies it to
/tmp/b on the machine; the calls must follow each other while the machine is warm (it is given back
after about 30 s idle); the last call joins the parts, installs the wheels into /tmp/site and runs the
benchmark. ``--dir`` must be ignored by git (``.dev/`` is, in .gitignore).
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tarfile
from importlib import metadata

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WHEELS = ["ray=={ray}", "gguf=={gguf}", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py"]
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux1_x86_64"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=".dev")
    ap.add_argument("--part-mib", type=int, default=60)
    args = ap.parse_args()
    from app.models import smollm2_gguf_path

    wheels = os.path.join(args.dir, "wheels")
    os.makedirs(wheels, exist_ok=True)
    specs = [w.format(ray=metadata.version("ray"), gguf=metadata.version("gguf")) for w in WHEELS]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", wheels] + [a for p in PLATFORMS for a in ("--platform", p)] + specs
    subprocess.run(cmd, check=True)
    gguf = smollm2_gguf_path()
    tar_path = os.path.join(args.dir, "bundle.tar")
    with tarfile.open(tar_path, "w") as tar:
        for w in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
            tar.add(w, arcname=os.path.basename(w))
        tar.add(gguf, arcname="model.gguf")
    for old in glob.glob(os.path.join(args.dir, "part*")):
        os.remove(old)
    size, parts = args.part_mib << 20, []
    with open(tar_path, "rb") as f:
        while chunk := f.read(size):
            parts.append(os.path.join(args.dir, f"part{len(parts):02d}"))
            with open(parts[-1], "wb") as out:
                out.write(chunk)
    os.remove(tar_path)
    print(f"{len(parts)} parts in {args.dir}/ ({os.path.getsize(gguf) >> 20} MiB model, "
          f"{sum(os.path.getsize(p) for p in parts) >> 20} MiB in all). Device calls, back to back:")
    for p in parts[:-1]:
        print(f'  run(carry=["{p}"], timeout_s=120, command="mkdir -p /tmp/b && cp {p} /tmp/b/")')
    last = parts[-1]
    print(f'  run(carry=["{last}"], timeout_s=540, command="mkdir -p /tmp/b && cp {last} /tmp/b/ && cd /tmp/b && '
          'cat part* | tar x && cd - >/dev/null && python3 -m pip install -q --no-index --no-deps --no-compile '
          '--target /tmp/site /tmp/b/*.whl && export PYTHONPATH=/tmp/site:$PWD RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 '
          'PYTHONUNBUFFERED=1 && python3 benchmarks/gpu_scoring.py --model /tmp/b/model.gguf --out $OUT '
          '> $OUT/log.txt 2>&1; tail -n 12 $OUT/log.txt")')


if __name__ == "__main__":
    main()
