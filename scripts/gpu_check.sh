#!/usr/bin/env bash
# The GPU check: puts the NeMo 2.7.3 stack on a bare GPU node and runs the GPU tests there,
# once without TransformerEngine (tests/no_te hides it) and once with it. In the NeMo container
# (TE, Apex and the stack already there) only `test` is needed.
#
#   scripts/gpu_check.sh prepare          # here, on a machine with PyPI: .gpu-wheels/ (the overlay,
#                                         #   ../shared/gpu), .gpu-te/ (TE 2.20.2 in 56 MB parts),
#                                         #   .gpu-node/ (the node-side scripts); all git-ignored
# On the node, from the repository root (each call may bring only some of those files: a lent
# node takes at most 64 MiB a call, so the TE parts travel one per call):
#   scripts/gpu_check.sh stage            # installs what arrived; starts TE's build (detached, ~2
#                                         #   min) once every TE piece is in /opt/te
#   scripts/gpu_check.sh test no-te|te [pytest args]   # pytest -m gpu, logs to $OUT or gpu-check/
#     GPU_CHECK_GROUPS="one_gpu resume_one_gpu" picks groups (default: all the node's GPUs allow);
#     GPU_CHECK_TIMEOUT=<s> bounds each group (default 520)
#   scripts/gpu_check.sh bench te-free|te|nan [bench.py args]   # bench/bench.py sets, to $OUT
#
# Node-only changes (never in the package): the overlay in /opt/coom_pkgs, TE in the node's
# Python, and a numpy-2 shim (megatron-core 0.15.3 calls np.product, removed in numpy 2, when it
# saves distributed checkpoints: dist_checkpointing/exchange_utils.py:66).
set -euo pipefail
cd "$(dirname "$0")/.."
overlay=/opt/coom_pkgs te_dir=/opt/te
out=${OUT:-gpu-check}

prepare() {
  local shared=${SHARED:-../shared/gpu}
  [[ -f .gpu-wheels/.complete ]] || { "$shared/build-wheelhouse.sh" .gpu-wheels && touch .gpu-wheels/.complete; }
  [[ -f .gpu-te/wheel.sha256 ]] || "$shared/te/fetch-te.sh" .gpu-te
  mkdir -p .gpu-node && cp "$shared/install-overlay.sh" "$shared/te/build-te.sh" .gpu-node/
  du -sh .gpu-wheels .gpu-te/* .gpu-node
}

stage() {
  if [[ -d .gpu-wheels && ! -f $overlay/.done ]]; then
    bash .gpu-node/install-overlay.sh .gpu-wheels
  fi
  mkdir -p $te_dir
  for f in .gpu-te/* .gpu-node/build-te.sh; do [[ -f $f ]] && cp -n "$f" $te_dir/; done
  local pieces=(part00 part01 part02 part03 part04 te_torch.tar.gz build-te.sh
                transformer_engine-2.20.2-py3-none-any.whl)
  local missing=() p
  for p in "${pieces[@]}"; do [[ -f $te_dir/$p ]] || missing+=("$p"); done
  if ((${#missing[@]})); then
    echo "TE pieces still missing in $te_dir: ${missing[*]}"
  elif [[ ! -f $te_dir/build_start ]]; then
    (cd $te_dir && setsid nohup bash build-te.sh > outer.log 2>&1 < /dev/null &)
    echo "TE build started in $te_dir (about 2 minutes; build_end marks the end)"
  fi
}

wait_for() {  # wait_for FILE SECONDS WHAT
  local waited=0
  while [[ ! -f $1 ]]; do
    ((waited >= $2)) && { echo "gave up waiting for $3 ($1)" >&2; return 1; }
    sleep 5; waited=$((waited + 5))
  done
}

# Groups run side by side (the node has the cores; correctness tests, no timing): the 1-GPU
# tests on the last GPU (the kill-and-resume launches in a group of their own), and the 2-GPU
# tests in two groups on both; a group needing more GPUs than the node has is left out.
# name|markers (-m)|test names (-k)|GPUs|GPUs needed
TEST_GROUPS=("one_gpu|gpu and not gpus2|not kill_on_one_gpu|last|1"
             "resume_one_gpu|gpu and not gpus2|kill_on_one_gpu|last|1"
             "layouts|gpus2|two_gpu_layouts|all|2"
             "faults|gpus2|not two_gpu_layouts|all|2")

run_tests() {  # run_tests no-te|te [pytest args]
  local pass=$1; shift
  mkdir -p "$out"
  wait_for $overlay/.done 300 "the overlay"
  local path="$PWD:$PWD/tests:$overlay"
  if [[ $pass == no-te ]]; then
    path="$PWD/tests/no_te:$path"
  else
    wait_for $te_dir/build_end 400 "TE's build" || true
    tail -1 $te_dir/build.log 2>/dev/null || true
  fi
  local log="$out/gpu_check_$pass.log" results gpus last
  results="$(cd "$out" && pwd)/gpu_check_$pass.jsonl"
  rm -f "$results"
  gpus=$(nvidia-smi -L | wc -l); last=$((gpus - 1))
  {
    echo "# scripts/gpu_check.sh test $pass $*  ($(date -u '+%Y-%m-%d %H:%M UTC'), $gpus GPUs)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    # versions from the installed metadata (importing nemo here would cost ~30 s)
    PYTHONPATH=$path python3 -c "import importlib.metadata as md
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return 'absent'
print(*(f'{n} {v(n)}' for n in ('torch', 'nemo_toolkit', 'megatron_core', 'numpy',
      'transformer_engine')), sep=', ')" 2>&1 | tail -1 || true
    if [[ $pass == no-te ]]; then echo "(TE hidden from the tests by tests/no_te)"; fi
  } | tee "$log"
  local group name marks keywords devices needed pids=() names=() groups=()
  for group in "${TEST_GROUPS[@]}"; do
    IFS='|' read -r name marks keywords devices needed <<< "$group"
    if [[ -n ${GPU_CHECK_GROUPS:-} && " $GPU_CHECK_GROUPS " != *" $name "* ]]; then
      continue
    fi
    if ((gpus < needed)); then
      echo "## group $name left out: it needs $needed GPUs, the node has $gpus" | tee -a "$log"
      continue
    fi
    [[ $devices == last ]] && devices=$last || devices=$(seq -s, 0 $last)
    ( CUDA_VISIBLE_DEVICES=$devices PYTHONPATH=$path GPU_CHECK_RESULTS="$results" timeout "${GPU_CHECK_TIMEOUT:-520}" \
      env PYTHONUNBUFFERED=1 python3 -m pytest -m "$marks" -k "$keywords" -p no:cacheprovider -v -rA \
      --durations=10 "$@" > "$out/gpu_check_${pass}_$name.log" 2>&1 ) &
    pids+=($!); names+=("$name"); groups+=("$group")
  done
  local rc=0 i
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || rc=1
    { echo; echo "## group ${names[$i]} (-m \"$(cut -d'|' -f2 <<< "${groups[$i]}")\")"
      grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|error|skipped|deselected" \
        "$out/gpu_check_${pass}_${names[$i]}.log" | tail -40; } | tee -a "$log"
  done
  echo "# exit status $rc" | tee -a "$log"
  return "$rc"
}

# Bench sets (bench/bench.py variants, run in this order; the first of each comparison first,
# so a budget cut leaves whole pairs). Timings need a quiet GPU: run them alone.
declare -A BENCH_SETS=(
  [te-free]="^llama-stock-local-bf16$ ^llama-coom-sdpa-bf16-mbs4$ ^llama-coom-sdpa-bf16$
             ^llama-coom-sdpa-bf16-mbs8$"
  [te]="^llama-stock-te-fp8$ ^llama-coom-te-fp8-mbs8$ ^moe-stock-te-bf16$ ^moe-coom-te-bf16-mbs8$
        ^llama-stock-te-bf16$ ^llama-coom-te-bf16-mbs8$ ^llama-coom-te-fp8-mbs4$
        ^moe-coom-te-bf16-mbs4$ ^llama-coom-te-fp8-mbs4-native-ce$ ^llama-stock-te-fp8-mbs4$
        ^llama-coom-te-fp8-mbs4-te-swiglu$ ^moe-coom-te-bf16$ ^moe-coom-te-bf16-mbs8-router-fusion$
        ^moe-coom-te-bf16-mbs8-rope-fusion$"
  # BF16 on the TE spec, repeated for its NaN rate (no timing: may run beside the tests)
  [nan]="^llama-coom-te-bf16$"
)

run_bench() {  # run_bench te-free|te|nan [bench.py args]
  local set=$1; shift
  [[ -n ${BENCH_SETS[$set]:-} ]] || { echo "bench set: $set is not one of ${!BENCH_SETS[*]}" >&2; return 2; }
  wait_for $overlay/.done 300 "the overlay"
  [[ $set == te-free ]] || wait_for $te_dir/build_end 400 "TE's build"
  local patterns
  read -r -a patterns <<< "$(tr '\n' ' ' <<< "${BENCH_SETS[$set]}")"
  mkdir -p "$out"
  PYTHONPATH=$PWD:$overlay PYTHONUNBUFFERED=1 python3 bench/bench.py --out "$out/bench_$set" \
    --only "${patterns[@]}" "$@"
}

case ${1:-} in
  prepare) prepare ;;
  stage) stage ;;
  test) shift; run_tests "$@" ;;
  bench) shift; run_bench "$@" ;;
  *) sed -n '2,19p' "$0"; exit 2 ;;
esac
