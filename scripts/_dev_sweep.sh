export PYTHONPATH=$(pwd) PYTHONUNBUFFERED=1
python3 -m pytest -q -m gpu tests/test_gpu_kernels.py 2>&1 | tail -2
python3 - <<'PY'
from cupyq import runtime
for mt in (1, 2, 4, 8):
    f = runtime.get_function("qgemm.cu", runtime.qgemm_name("__half", mt, False, True), 0)
    print("MT", mt, "regs", f.num_regs, "local", f.local_size_bytes, "smem", f.shared_size_bytes)
PY
for mb in 1 2 3 4; do
  echo "== MIN_BLOCKS=$mb"
  CUPYQ_NVRTC_OPTIONS="-DCUPYQ_MIN_BLOCKS=$mb" python3 -c "
from cupyq import runtime
print('regs', [runtime.get_function('qgemm.cu', runtime.qgemm_name('__half', mt, False, True), 0).num_regs for mt in (1,2,4,8)])"
  CUPYQ_NVRTC_OPTIONS="-DCUPYQ_MIN_BLOCKS=$mb" python3 -m cupyq.bench --shapes 4096x4096,8192x28672 --ms 1,8,32,64 --formats gptq,gptq_act --baselines "" --iters 20 2>&1 | grep -E "^\| [0-9]|host"
done
