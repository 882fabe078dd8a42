#!/usr/bin/env bash
# One GPU call (the device tool, carry [".whl"] from bench/gpu_wheels.sh): installs the wheels, then
# runs the stages named (default: all), each writing its log and JSON under $OUT:
#   tests     pytest -m gpu (every GPU test of the suite)
#   parallel  pytest -m gpu in one call's time: the four kill-and-resume runs in the background, beside the probe
#             tests (each measures its own peaks) and then every other GPU test (logs: gpu_*.log, resume_*.log)
#   quick     pytest -m gpu on the fast path alone (speed-ups, generation, fast path); QUICK_TESTS chooses
#             other tests, QUICK_MARK= (empty) runs their CPU tests too (test_deepspeed then runs on the GPU)
#   generate  bench/generate.py: reference vs fast beam-3 generation, fp32 and bf16
#   train     bench/train_throughput.py: the published configuration vs auto's plan (TRAIN_ROWS: others, e.g.
#             plain:bf16:16,plain:bf16:64 for issue 33's rows through the loader)
#   backends  bench/backends.py: every engine, 200 steps
#   profile   bench/profile_step.py at batch 256 without and with the step speed-ups, and 512 with
#   fused     issue 33: the fused relational memory's tests (compiled kernels, bf16), then bench/profile_step.py at
#             batch 16 and 64: the code in .base (an older commit: git archive REV | tar -x -C .base, carried), this
#             tree without fused_memory, this tree (same machine, same call)
#   graphs    the speed-ups' GPU tests (CUDA graphs of the encoder-decoder and of the whole model, 100 steps)
#   streams   bench/stream_check.py: whole-model graphs vs eager in fp32, per way of running the relational memory
#   trace     bench/profile_step.py (whole-model graphs) at batch 16 and 64 with its Chrome trace, summarised by
#             bench/trace_summary.py (traces gzipped under $OUT)
#   confirm   the GPU tests of what changed (speed-ups, engines, fused memory; QUICK_TESTS overrides) with
#             DeepSpeed's kill-and-resume (bf16) beside them, then `auto` (as the stage below)
#   auto      the README's first command (r2gen-launch auto, embedded set), timed; its run's metrics.jsonl under $OUT
#   auto-ab   issue 33: auto with cuDNN autotuning forced on (thresholds), then as planned; same machine, one at a time
#   bn        issue 33's next target, measured before building: bench/batchnorm.py (ResNet-101's BatchNorms per dtype
#             and layout) at batch 16 and 64; the whole step with and without cuDNN autotuning, and what a new
#             shape's first step costs with and without it
#   mutants   bench/mutants.sh gpu: each GPU mutant's named test must fail (logs mutant_*.log; MUTANTS=NAME... for some)
#   study     r2gen-launch study --precisions fp32,fp16,bf16,fp8 on the iu_xray preset
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH="/tmp/site:$PWD/.whl/py:$PWD" PATH="/tmp/site/bin:$PATH"  # ninja (DeepSpeedCPUAdam JIT-builds with it)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
cli() { python3 -c 'from launcher.cli import main; main()' "$@"; }
auto() {  # the README's first command, timed (arguments: auto's flags; AUTO_TAG names the logs); metrics.jsonl under $OUT
  local tag=${AUTO_TAG:-auto}
  rm -rf /tmp/auto && mkdir -p /tmp/auto && local start=$SECONDS
  date +%s.%N > "$OUT/${tag}_start.txt"  # the command's start, for the time to a val score from metrics.jsonl
  (cd /tmp/auto && python3 -c 'from launcher.cli import main; main()' auto "$@") > "$OUT/$tag.log" 2>&1
  echo "$tag: rc $? in $((SECONDS - start)) s wall"; tail -25 "$OUT/$tag.log"
  cp /tmp/auto/runs/*/metrics.jsonl "$OUT/${tag}_metrics.jsonl" 2>/dev/null
}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests generate profile train backends study)
for stage in "${stages[@]}"; do
  echo "== $stage"; began=$SECONDS
  case "$stage" in
    tests) python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -30 ;;
    parallel)
      for e in deepspeed-bf16 plain-bf16 accelerate-bf16 accelerate-fp16; do  # the longest first
        python3 -m pytest -m gpu -q -rP -p no:cacheprovider "tests/test_resume.py::test_gpu_kill_and_resume[$e]" \
          >"$OUT/resume_$e.log" 2>&1 &
      done
      python3 -m pytest -m gpu -q -rP -p no:cacheprovider tests/test_probe_gpu.py >"$OUT/gpu_probe.log" 2>&1; tail -3 "$OUT/gpu_probe.log"
      python3 -m pytest -m gpu -q -rP -p no:cacheprovider tests --deselect tests/test_probe_gpu.py -k "not gpu_kill" \
        >"$OUT/gpu_rest.log" 2>&1
      wait; for f in "$OUT"/gpu_rest.log "$OUT"/resume_*.log; do echo "$f: $(tail -1 "$f")"; done ;;
    quick) python3 -m pytest -m "${QUICK_MARK-gpu}" -q -rP -p no:cacheprovider ${QUICK_TESTS:-tests/test_speedups.py tests/test_generation.py} \
             2>&1 | tee "$OUT/gpu_quick.log" | tail -30 ;;
    fused)
      python3 -m pytest -q -rP -p no:cacheprovider tests/test_fused_memory.py 2>&1 | tee "$OUT/fused_tests.log" | tail -5
      for b in ${FUSED_BATCHES:-16 64}; do
        [ -d .base ] && (cd .base && echo "## baseline (.base) batch $b" && python3 bench/profile_step.py --batch-size "$b" --top 8)
        [ "$b" = 16 ] && echo "## this tree, fused_memory off, batch $b" && \
          python3 bench/profile_step.py --batch-size "$b" --top 8 --speedups-off fused_memory
        echo "## this tree, encoder-decoder graphs only, batch $b"
        python3 bench/profile_step.py --batch-size "$b" --top 8 --encoder-decoder-graphs
        echo "## this tree (whole-model graphs), batch $b"; python3 bench/profile_step.py --batch-size "$b" --top 8
      done 2>&1 | tee "$OUT/profile_fused.log" | grep -E "^##|kernels per step|^. (visual|encoder|  of|whole)" ;;
    streams) python3 bench/stream_check.py ${STREAM_VARIANTS:+--variants "$STREAM_VARIANTS"} 2>&1 | tee "$OUT/stream_check.log" | tail -14 ;;
    trace)
      for b in ${TRACE_BATCHES:-16 64}; do
        python3 bench/profile_step.py --batch-size "$b" --top 5 --trace "/tmp/trace_$b.json" ${TRACE_ARGS:-} \
          > "$OUT/profile_trace_$b.log" 2>&1
        grep -E "kernels per step|^. (visual|encoder|  of|whole)" "$OUT/profile_trace_$b.log"
        python3 bench/trace_summary.py "/tmp/trace_$b.json" --top 12 2>&1 | tee "$OUT/trace_summary_$b.log" | head -60
        gzip -c "/tmp/trace_$b.json" > "$OUT/trace_$b.json.gz"
      done ;;
    confirm)
      python3 -m pytest -m gpu -q -rP -p no:cacheprovider "tests/test_resume.py::test_gpu_kill_and_resume[deepspeed-bf16]" \
        > "$OUT/resume_deepspeed-bf16.log" 2>&1 &
      python3 -m pytest -m gpu -q -p no:cacheprovider ${QUICK_TESTS:-tests/test_speedups.py tests/test_backends.py tests/test_fused_memory.py} \
        2>&1 | tee "$OUT/gpu_confirm.log" | tail -12
      auto; wait; echo "resume deepspeed-bf16: $(tail -1 "$OUT/resume_deepspeed-bf16.log")" ;;
    graphs) python3 -m pytest -m gpu -q -rP -p no:cacheprovider tests/test_speedups.py 2>&1 | tee "$OUT/speedups_tests.log" | tail -8 ;;
    auto) auto ;;
    auto-ab)  # the same machine, one after the other: auto with cuDNN autotuning at every micro-batch (as before the
              # plan decided it), then as planned (off at auto's micro-batch on the embedded set)
      printf 'autotune_below_micro_batch: 100000\n' > /tmp/always_tune.yaml
      AUTO_TAG=auto_tuned auto --thresholds /tmp/always_tune.yaml; AUTO_TAG=auto_planned auto ;;
    bn)
      { for b in 16 64; do python3 bench/batchnorm.py --batch-size "$b"; done
        for b in 16 64; do echo "## batch $b, cudnn_benchmark off"
          python3 bench/profile_step.py --batch-size "$b" --top 3 --speedups-off cudnn_benchmark | grep -E "kernels per step|^. (visual|encoder|  of|whole)"; done
        echo "## first step against steady: autotuning on, then off"; python3 bench/profile_step.py --new-shapes 65,20
        python3 bench/profile_step.py --new-shapes 65,20 --speedups-off cudnn_benchmark; } 2>&1 | tee "$OUT/bn.log" ;;
    mutants) bash bench/mutants.sh gpu ${MUTANTS:-} 2>&1 | tee "$OUT/mutants.log" ;;
    generate)
      python3 bench/generate.py --precision fp32 --batch-sizes 16,64,256 --studies 256 --json "$OUT/generate_fp32.json" \
        2>&1 | tee "$OUT/generate.log" ;;
    generate-bf16)
      python3 bench/generate.py --precision bf16 --batch-sizes 64,256 --studies 256 --json "$OUT/generate_bf16.json" ;;
    profile) { python3 bench/profile_step.py --batch-size 256 --no-speedups; python3 bench/profile_step.py --batch-size 256
               python3 bench/profile_step.py --batch-size 512 --top 5; } 2>&1 | tee "$OUT/profile.log" ;;
    train) python3 bench/train_throughput.py --steps "${TRAIN_STEPS:-20}" --warmup "${TRAIN_WARMUP:--1}" --studies "${TRAIN_STUDIES:-6000}" \
             --rows "${TRAIN_ROWS:-reference,auto-eager,auto}" --json "$OUT/train_throughput.json" 2>&1 | tee "$OUT/train.log" ;;
    backends) python3 bench/backends.py --steps 200 --json "$OUT/backends.json" ;;
    study) timeout "${STUDY_TIMEOUT:-3000}" python3 -c 'from launcher.cli import main; main()' study \
             --precisions "${STUDY_PRECISIONS:-fp32,fp16,bf16,fp8}" --epochs "${STUDY_EPOCHS:-3}" --run-dir /tmp/runs --name prec \
             2>&1 | tee "$OUT/study.log" | tail -40
           cp /tmp/runs/prec/summary.json /tmp/runs/prec/report.html "$OUT/" 2>/dev/null ;;  # what finished, if cut off
    *) echo "unknown stage $stage" ;;
  esac
  echo "== $stage: $((SECONDS - began)) s"
done
