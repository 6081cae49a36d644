export PYTHONPATH=$(pwd) PYTHONUNBUFFERED=1
python3 -m pytest -q -m gpu tests/test_gpu_kernels.py -x 2>&1 | tail -2
for st in 4 8 16; do
  echo "== MT1_STEP_CHUNKS=$st"
  CUPYQ_MT1_STEP_CHUNKS=$st python3 -c "
from cupyq import runtime
print('regs', [runtime.get_function('qgemm.cu', runtime.qgemm_name('__half', mt, False, True), 0).num_regs for mt in (1,2,4,8)])"
  CUPYQ_MT1_STEP_CHUNKS=$st python3 -m cupyq.bench --shapes 4096x4096,8192x28672,28672x8192 --ms 1,4,8 --formats gptq,gptq_act,exl2 --baselines "" --iters 20 2>&1 | grep -E "^\| [0-9]|host"
done
