#!/usr/bin/env bash
# GPU checks, for a session that is lent a GPU machine: bf16 precisions, FSDP2 on one GPU, 7B-shape
# LoRA throughput. Usage (repo root, on the GPU machine): bash benchmarks/gpu_check.sh OUT_DIR
# Wheels the image lacks can be put in .gpu_wheels/ (pip download --no-deps ... on a networked machine).
set -uo pipefail
OUT=${1:-out/gpu_check}
mkdir -p "$OUT"
if ls .gpu_wheels/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps .gpu_wheels/*.whl; fi
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning, transformers, peft; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"

_fit() {  # name, then overrides
  local name=$1; shift
  local start=$SECONDS
  python3 -m lightning_tune fit --config tiny_lora.yaml --trainer.accelerator=gpu --trainer.devices=1 \
    --trainer.enable_progress_bar=false --trainer.default_root_dir="$OUT/$name" "$@" \
    --trainer.logger=lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir="$OUT/$name" > "$OUT/$name.log" 2>&1
  local rc=$?
  local metrics=$(ls "$OUT/$name"/lightning_logs/version_*/metrics.csv 2>/dev/null | head -1)
  [ -n "$metrics" ] && cp "$metrics" "$OUT/$name.csv"
  printf '%-32s rc=%s  %4ss  ' "$name" "$rc" "$((SECONDS - start))"
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
fit tiny_lora_fp32 --trainer.precision=32 --trainer.max_steps=$STEPS
fit tiny_lora_bf16_mixed --trainer.precision=bf16-mixed --trainer.max_steps=$STEPS
fit tiny_lora_bf16_true --trainer.precision=bf16-true --trainer.max_steps=$STEPS
fit tiny_lora_fsdp2 --trainer.strategy=fsdp2 --trainer.precision=bf16-mixed --trainer.max_steps=$STEPS
fit tiny_full_fsdp2 --config tiny_full.yaml --trainer.accelerator=gpu --trainer.strategy=fsdp2 --trainer.precision=bf16-mixed --trainer.max_steps=$STEPS
# Llama 2 7B shape (random init, real vocab 32000 >= the demo tokenizer's 512), LoRA q/v rank 8
LORA7B=(--model.model=llama2_7b --model.model_args=null --model.lora_rank=8 --model.lora_alpha=16 "--model.lora_attn_modules=[q_proj,v_proj]"
  --model.apply_lora_to_mlp=false --model.apply_lora_to_output=false --model.export=false --data.batch_size=8 --data.max_seq_len=256
  --trainer.max_steps=${STEPS_7B:-30} --trainer.val_check_interval=null --trainer.check_val_every_n_epoch=1 --trainer.limit_val_batches=0 --trainer.log_every_n_steps=1)
fit llama2_7b_lora_bf16_true "${LORA7B[@]}" --trainer.precision=bf16-true
fit llama2_7b_lora_bf16_true_ckpt "${LORA7B[@]}" --trainer.precision=bf16-true --model.activation_checkpointing=true
fit llama2_7b_lora_fsdp2_bf16 "${LORA7B[@]}" --trainer.strategy=fsdp2 --trainer.precision=bf16-true
