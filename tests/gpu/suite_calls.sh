#!/usr/bin/env bash
# The GPU suite and the speed records in few device calls, on one warm machine (tests/gpu/results/README.md).
# Run from the repository root on the GPU host, after `source .gpu_bundle/setup_gpu_host.sh`:
#
#   COMMIT=<hash> [DEMO=0] bash tests/gpu/suite_calls.sh speed|speed_families|compiled|profile|tests1|tests2|soaks|suite_a|suite_b|serve|short|tp2|pick [seconds]
#
#   speed   benchmarks/offline_throughput.py at SDAR-1.7B shapes: vLLM AR + every plugin mode on one engine,
#           batch 1/16/64/256 (the baseline in the same call)
#   speed_families benchmarks/offline_throughput.py at Fast-dLLM v2 1.5B and LLaDA2-mini shapes: vLLM AR + t s v
#           (threshold, S2D2 default, always verify), batch 1/16/64, one after the other
#   compiled benchmarks/offline_throughput.py: vLLM AR, the plugin's static / dynamic / always-verify modes with
#           the compiled integer stages (cdv, the default) and with the model math compiled too (xyz:
#           VLLM_S2D2_COMPILE_CORE=1, experimental), batch 1/16/64
#   profile benchmarks/profile_step.py at SDAR-1.7B shapes: vLLM AR, static, always verify at batch 1 and 64
#           (GPU-busy fraction, kernels and launches per step; the baseline in the same call)
#   tests1  the batch-invariant soak (first: ~7.5 min), test_canvas_kernel_gpu, test_engine_sdar,
#           test_engine_s2d2, test_serve (~5 min on 4 workers); first the demo through the engine (and the
#           reference decoder's columns, on the CPU), and beside the tests benchmarks/quality.py through the engine
#           on 200 held-out prompts, its text compared with the reference decoder's record
#   tests2  the default-kernel soak (first), test_engine_families, test_engine_d2f_gpu, test_lm_eval_gpu
#           (-n 6: 542 s at 9385694)
#   soaks   the demo's two soaks (-n 2; logs in soaks/) and, a minute later, the three family soaks (-n 3, a second
#           pytest run; logs in families/), ~8.5 min
#   suite_a test_canvas_kernel_gpu, test_engine_sdar, test_engine_s2d2, test_serve (-n 6; not yet timed without
#           the soaks beside it)
#   suite_b test_sdar_default_cuda_graphs, test_exact_prefill_equals_eager, test_engine_families,
#           test_engine_d2f_gpu, test_lm_eval_gpu (-n 8, ~7.5 min)
#           (soaks + suite_a + suite_b = the whole single-GPU suite: no demo and no quality run; all of it in one
#           call at -n 12 ran out of its 555 s at a2595e8, every test ~2x slower; in two calls, at 851c6e7 and
#           5ab796b, the soaks' call was cut)
#   serve   benchmarks/serve_bench.py: vllm-ar (the baseline, first), threshold, s2d2 servers of the demo
#           checkpoint, 64 requests at concurrency 1 / 16 / 64 (each server takes ~75 s to start: ~5.5 min);
#           SERVE_MODES overrides the list
#   tp2     test_tp2 (a two-GPU host only)
#   short   the batch-invariant soak (first) and the three family soaks (-n 4, ~9 min): what a short device
#           budget checks first (tests/gpu/results/README.md)
#   pick    TESTS="<pytest node ids>" [WORKERS=2]: the named GPU tests only (a short device budget)
#
# [seconds] counts from $CALL_START (epoch seconds; default: when this script starts).  Set it first thing in the
# device command, before `source .gpu_bundle/setup_gpu_host.sh` (~20 s), and give `run` a timeout_s at least
# [seconds] + 15: everything stops at [seconds] - 15 and the tar is written before [seconds].  (At 5ab796b a
# suite_b call with limit 415 under timeout_s 440 ran past its timeout after the set-up, and nothing came back.)
#
# The test calls share the GPU between pytest-xdist workers (tests/gpu/gpu_env.py: own ports, a fixed KV cache
# per engine) and stop at [seconds] (default 560, under a device call's 10 minutes); the controller's
# gpu-session-partial.json keeps every finished test's outcome if the limit cuts the run.  Everything is written
# to /tmp/s2d2-calls/<call>/ (each worker's logs in a subfolder) and comes back as one file, $OUT/<call>.tar.gz
# (a device call returns only a few files).
set -uo pipefail
call=${1:?call name}
limit=${2:-560}
call_start=${CALL_START:-$(date +%s)}
elapsed() { echo $(($(date +%s) - call_start)); }  # seconds since the call started
left() {  # seconds to the stop, with room for the tar (at least 1)
  local s=$((limit - 15 - $(elapsed))); echo $((s > 0 ? s : 1))
}
: "${OUT:?set OUT to the output folder}"
work=/tmp/s2d2-calls
dest=$work/$call
rm -rf "$dest"; mkdir -p "$dest"
export S2D2_GPU_LOG_DIR=$dest COMMIT=${COMMIT:-unknown}
nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9 2>/dev/null

pytest_call() {  # workers, files...  (stops at [seconds] from the start of the call; logs to $PYTEST_LOG or $dest)
  local workers=$1; shift
  local log=${PYTEST_LOG:-$dest}
  mkdir -p "$log"
  S2D2_GPU_LOG_DIR=$log timeout -k 5 "$(left)" python3 -m pytest -v -rs -p no:cacheprovider -m gpu \
    -n "$workers" "$@" > "$log/pytest.log" 2>&1
  echo "pytest exit $? after $(elapsed) s of the call" >> "$log/pytest.log"
  tail -n 25 "$log/pytest.log"
}

case $call in
  speed)
    timeout -k 5 "$(left)" python3 benchmarks/offline_throughput.py --modes a,cdshumv --batches 1,16,64,256 \
      --out "$dest/offline_throughput.json" > "$dest/offline.log" 2>&1
    echo "offline exit $? after $(elapsed) s of the call" >> "$dest/offline.log"
    tail -n 40 "$dest/offline.log" ;;
  speed_families)
    # Fast-dLLM v2 1.5B then LLaDA2-mini shapes, each with its vLLM AR baseline first (its own engine group); the
    # first gets half the call's time
    timeout -k 5 "$(( $(left) / 2 ))" python3 benchmarks/offline_throughput.py --family fast-1.5b --modes a,tsv \
      --batches 1,16,64 --out "$dest/offline_throughput_fast-1.5b.json" > "$dest/offline_fast.log" 2>&1
    echo "fast-1.5b exit $? after $(elapsed) s of the call" >> "$dest/offline_fast.log"
    timeout -k 5 "$(left)" python3 benchmarks/offline_throughput.py --family llada2-mini --modes a,tsv \
      --batches 1,16,64 --out "$dest/offline_throughput_llada2-mini.json" > "$dest/offline_llada2.log" 2>&1
    echo "llada2-mini exit $? after $(elapsed) s of the call" >> "$dest/offline_llada2.log"
    tail -n 15 "$dest/offline_fast.log" "$dest/offline_llada2.log" ;;
  compiled)
    timeout -k 5 "$(left)" python3 benchmarks/offline_throughput.py --modes a,cdv,xyz --batches 1,16,64 \
      --out "$dest/offline_compiled.json" > "$dest/offline.log" 2>&1
    echo "offline exit $? after $(elapsed) s of the call" >> "$dest/offline.log"
    tail -n 40 "$dest/offline.log" ;;
  profile)
    timeout -k 5 "$(left)" python3 benchmarks/profile_step.py --modes a,c,v --batches 1,64 \
      --out "$dest/profile_step.json" > "$dest/profile.log" 2>&1
    echo "profile exit $? after $(elapsed) s of the call" >> "$dest/profile.log"
    tail -n 40 "$dest/profile.log" ;;
  tests1)
    # the demo alone first (its engine profiles free GPU memory); the reference columns on the CPU meanwhile.
    # DEMO=0 skips it (~100 s) when the session's device time is short.
    if [[ ${DEMO:-1} != 0 ]]; then
      python3 -m vllm_s2d2.cli demo --backend reference --width 160 > "$dest/demo_reference.txt" 2>&1 &
      timeout -k 5 150 python3 -m vllm_s2d2.cli demo --backend vllm --width 160 > "$dest/demo_vllm.txt" 2>&1
      echo "demo exit $? after $(elapsed) s of the call" >> "$dest/demo_vllm.txt"
    fi
    # beside the tests: a fixed KV cache and a small utilization, as every engine of a test worker (gpu_env.py)
    timeout -k 5 "$(left)" python3 benchmarks/quality.py --backend vllm --num-prompts 200 --max-tokens 24 \
      --gpu-memory-utilization 0.08 --kv-cache-gib 2 --tag "vllm-h100-$COMMIT" --out-dir "$dest" \
      --compare benchmarks/results/quality_reference_2026-11-22-n200.json > "$dest/quality.log" 2>&1 &
    quality=$!
    pytest_call 5 "tests/gpu/test_soak.py::test_soak_under_kv_pressure[batch_invariant]" \
      tests/gpu/test_canvas_kernel_gpu.py tests/gpu/test_engine_sdar.py tests/gpu/test_engine_s2d2.py \
      tests/gpu/test_serve.py
    wait $quality; echo "quality exit $? after $(elapsed) s of the call" >> "$dest/quality.log"
    wait; tail -n 20 "$dest/quality.log" ;;
  tests2)
    # the soak first: the longest test; listed last, xdist handed it out after the others and the call's limit
    # cut it (9385694, tests1 of that run)
    pytest_call 6 "tests/gpu/test_soak.py::test_soak_under_kv_pressure[default]" tests/gpu/test_engine_families.py tests/gpu/test_engine_d2f_gpu.py \
      tests/gpu/test_lm_eval_gpu.py ;;
  soaks)
    # the demo's two soaks (~8.5 min each beside other workers) in a pytest run of their own, and beside them the
    # three family soaks (~3.5 min each; a second pytest run, 3 workers counting from 2: S2D2_GPU_WORKER_OFFSET,
    # gpu_env.py).  At 5ab796b the demo's soaks shared the GPU with five
    # test workers: seven engines compiling at once took ~4 min to start the soak servers and the 550 s limit cut
    # both soaks.
    (export PYTEST_LOG=$dest/soaks; pytest_call 2 "tests/gpu/test_soak.py::test_soak_under_kv_pressure[batch_invariant]" \
      "tests/gpu/test_soak.py::test_soak_under_kv_pressure[default]") &
    soaks=$!
    # the family soaks start a minute later, so the demo's soak servers compile with fewer engines beside them
    sleep 60
    (export PYTEST_LOG=$dest/families S2D2_GPU_WORKER_OFFSET=2; pytest_call 3 \
      tests/gpu/test_soak.py::test_family_soak_under_kv_pressure)
    wait $soaks ;;
  suite_a)
    # test_sdar_default_cuda_graphs and test_exact_prefill_equals_eager run in suite_b, the soaks and the kernel
    # tests in soaks (at 5ab796b, beside the soaks on 5 workers, 16 of these 19 tests finished in 550 s)
    pytest_call 6 tests/gpu/test_canvas_kernel_gpu.py tests/gpu/test_engine_sdar.py tests/gpu/test_engine_s2d2.py \
      tests/gpu/test_serve.py \
      --deselect tests/gpu/test_engine_sdar.py::test_sdar_default_cuda_graphs \
      --deselect tests/gpu/test_engine_sdar.py::test_exact_prefill_equals_eager ;;
  suite_b)
    pytest_call 8 tests/gpu/test_engine_sdar.py::test_sdar_default_cuda_graphs \
      tests/gpu/test_engine_sdar.py::test_exact_prefill_equals_eager tests/gpu/test_engine_families.py \
      tests/gpu/test_engine_d2f_gpu.py tests/gpu/test_lm_eval_gpu.py ;;
  serve)
    # vllm-ar (the baseline, first), the threshold baseline and S2D2: at 851c6e7 four servers (with the plugin's AR
    # mode) did not fit 470 s.  SERVE_MODES=vllm-ar,s2d2 (say) runs fewer servers when the device time is short.
    timeout -k 5 "$(left)" python3 benchmarks/serve_bench.py --modes "${SERVE_MODES:-vllm-ar,threshold,s2d2}" --out "$dest/serve_bench.json" \
      > "$dest/serve.log" 2>&1
    echo "serve exit $? after $(elapsed) s of the call" >> "$dest/serve.log"
    tail -n 30 "$dest/serve.log" ;;
  short)
    # the exact-prefill and fixed-order tests, short's first content, passed at 5ab796b: now the soaks that have
    # no verdict yet
    pytest_call 4 "tests/gpu/test_soak.py::test_soak_under_kv_pressure[batch_invariant]" \
      tests/gpu/test_soak.py::test_family_soak_under_kv_pressure ;;
  tp2)
    pytest_call 1 tests/gpu/test_tp2.py ;;
  pick)
    # shellcheck disable=SC2086  (TESTS is a list of node ids)
    pytest_call "${WORKERS:-2}" ${TESTS:?set TESTS to pytest node ids} ;;
  *) echo "unknown call $call" >&2; exit 2 ;;
esac
nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9 2>/dev/null
tar -C "$work" -czf "$OUT/$call.tar.gz" "$call"
