#!/usr/bin/env bash
# Prepares, on this machine, what benchmarks/gpu_check.sh needs on the lent GPU machine (issue 13), which reaches
# no network and whose image (Python 3.12, PyTorch, transformers, huggingface_hub, tensorboard, ...) lacks what
# `import avalanche_drcpsd` pulls in at start:
#   .whl/      wheels for CPython 3.12 / manylinux x86-64 of exactly those distributions, at the versions this
#              venv (the one CI tests) holds; wandb's wheel is repacked without its 50 MB of binaries
#              (wandb/bin: the wandb-core service, run only by wandb.init, which this package never calls;
#              Avalanche imports wandb at start, in avalanche/evaluation/metrics/confusion_matrix.py)
#   .devdata/  MNIST's four IDX files (the device machine receives the checkout only, not ../shared/data)
# Both folders are git-ignored; a device call names them in `carry`. The list below was derived on 2026-12-07 by
# importing avalanche_drcpsd and benchmarks/compare.py in this venv, mapping every module it loaded to its
# distribution, and keeping those the device image's package list (../.library/device/KINDS.md) does not name.
# Usage: bash benchmarks/gpu_bundle.sh        (PY=... to use another interpreter; DATA=... another data root)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}

DISTS="avalanche-lib diffusers torch-fidelity wandb pydantic pydantic_core annotated-types typing-inspection
pytorchcv qpsolvers dill gdown beautifulsoup4 soupsieve platformdirs googleapis-common-protos
opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common
opentelemetry-exporter-otlp-common opentelemetry-exporter-http-transport"

pins=$("$PY" - $DISTS <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
out = []
for name in sys.argv[1:]:
    try:
        out.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"gpu_bundle: {name!r} is not installed in this interpreter ({sys.executable}); "
                 "run .ci/bootstrap.sh first, or drop it from DISTS if the package no longer imports it")
print(" ".join(out))
EOF
)

rm -rf .whl .devdata
mkdir -p .whl .devdata/MNIST/raw
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins
# GPUtil is published as a source archive only: built here into a pure-Python wheel
"$PY" -m pip wheel -q --no-deps -w .whl "GPUtil==$("$PY" -c 'from importlib.metadata import version; print(version("GPUtil"))')"

# wandb without wandb/bin (RECORD rewritten so that pip accepts the wheel)
"$PY" - .whl <<'EOF'
import base64, csv, hashlib, io, pathlib, sys, zipfile
folder = pathlib.Path(sys.argv[1])
(wheel,) = folder.glob("wandb-*.whl")
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    names = [n for n in src.namelist() if not n.startswith("wandb/bin/")]
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    rows = []
    for name in names:
        if name == record:
            continue
        data = src.read(name)
        dst.writestr(src.getinfo(name), data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append([name, f"sha256={digest}", str(len(data))])
    rows.append([record, "", ""])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    dst.writestr(record, text.getvalue())
slim.replace(wheel)
EOF

cp "$DATA"/MNIST/raw/*.gz .devdata/MNIST/raw/
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
extra=$(du -cb .whl .devdata | tail -1 | cut -f1)
echo "gpu_bundle: .whl $(du -sh .whl | cut -f1), .devdata $(du -sh .devdata | cut -f1);" \
     "with the tracked files $(( (tracked + extra) / 1048576 )) MiB of the device call's 64 MiB"
