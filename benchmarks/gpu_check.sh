#!/usr/bin/env bash
# The GPU half of issue 26 (fully sharded training for real), in one run of under 10 minutes on one
# NVIDIA GPU (H100 80 GB or H200), from the repository root:
#
#   bash benchmarks/gpu_check.sh            # results also under $OUT (or ./gpu_check_out) as text
#
# 1. metaseq-train --ddp-backend fully_sharded --use-sharded-state --bf16 --fp16 on one GPU (torchrun,
#    NCCL) for a 1.3B-shaped jam_cross (two opt_1_3b-shaped branches, --cross-every 2: 3.76B
#    parameters; on a GPU with < 100 GB it uses --cross-every 4, 3.16B, and 1024-token sequences, since
#    FSDP on one rank keeps the fp32 weights and Adam moments whole: 16 bytes per parameter), on
#    synthetic tokens: tokens/s from metaseq's own wps, and MFU = tokens/s x FLOPs per token / peak.
# 2. In the same run, HF transformers' OPTForCausalLM at OPT-1.3B's shape (random weights), the same
#    tokens per step, fp32 weights + bf16 autocast + fused AdamW: tokens/s and MFU (the baseline).
# 3. The decode benchmark (benchmarks/bench_generate.py) for the 7B parent shape, bf16, batch 1 and 8,
#    CFG pairs, static and CUDA-graph modes: seconds per image beside the memory-bandwidth bound.
#
# FLOPs per token (forward + backward) = 6 x matmul parameters + 12 x attentions x T x E (as in
# benchmarks/bench_train.py); peak = 989 TFLOP/s dense bf16 (H100/H200 SXM; set PEAK_TFLOPS).
# Needs: a CUDA build of torch, metaseq (docs/METASEQ.md, installed as on a cluster) with fairscale,
# transformers, and this package importable (PYTHON, default python). Each step has its own time
# limit; a failed step prints why and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=4
BIN=$(dirname "$(command -v "$PY")")
PEAK=${PEAK_TFLOPS:-989}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
MEM_MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "${MEM_MB:-0}" -ge 100000 ]; then CROSS=2; T=2048; else CROSS=4; T=1024; fi
echo "jam_cross_1_3b: --cross-every $CROSS, $T tokens per sequence" | tee -a "$OUT/gpu.txt"

# ---- synthetic data: OPT-sized text vocabulary + 8192 image codes, documents of T+1 tokens --------
timeout 120 "$PY" - "$WORK/data" "$T" <<'PY' || { echo "data: failed"; exit 1; }
import json, random, sys
from pathlib import Path
from jam_metaseq.data.binarize import binarize
from jam_metaseq.vocab import VocabManifest

root, T = Path(sys.argv[1]), int(sys.argv[2])
vocab = VocabManifest(text_size=50000, image_codes=8192, num_sentinels=16, image_tokens_per_image=1024,
                      image_grid=(32, 32))

class Ids:  # text given as space-separated text ids
    spec, vocab_size = "ids", 50000
    def encode(self, text): return [int(t) for t in text.split()]
    def decode(self, ids): return " ".join(map(str, ids))

rng = random.Random(0)
root.mkdir(parents=True)
vocab.save(root / "vocab.json")
for split, n in (("train", 400), ("valid", 4)):
    (root / split).mkdir()
    jsonl = root / f"{split}.jsonl"
    with open(jsonl, "w") as f:
        for _ in range(n):
            text = " ".join(str(rng.randrange(50000)) for _ in range(T // 2))
            f.write(json.dumps({"segments": [{"text": text},
                                             {"image_tokens": [rng.randrange(8192) for _ in range(1024)]}]}) + "\n")
    binarize(jsonl, out_prefix=root / split / "mixed", vocab=vocab, text_tokenizer=Ids(), block_size=T + 1,
             progress=False)
PY

# ---- 1. jam_cross 1.3B-shaped, fully sharded, bf16, one GPU -------------------------------------------
LOG=$OUT/jam_fsdp.log
setsid "$BIN/torchrun" --nproc_per_node 1 "$BIN/metaseq-train" "$WORK/data" --user-dir "$PWD/jam_metaseq" \
  --task cm3_multimodal --criterion cm3 --arch jam_cross_1_3b --cross-every "$CROSS" \
  --tokens-per-sample "$T" --max-tokens "$T" --batch-size 1 --update-freq 1 --optimizer adam \
  --adam-betas "(0.9, 0.95)" --lr 1e-4 --lr-scheduler polynomial_decay --warmup-updates 5 \
  --total-num-update 1000 --max-update 1000 --ddp-backend fully_sharded --use-sharded-state --bf16 --fp16 \
  --log-format json --log-interval 5 --disable-validation --seed 1 --num-workers 2 \
  --save-dir "$WORK/ckpt" --save-interval-updates 100000 > "$LOG" 2>&1 &
TRAIN=$!
# Stop after 8 logged intervals (40 updates), before any checkpoint (one would be ~60 GB): no save.
for _ in $(seq 1 240); do
  sleep 1
  kill -0 "$TRAIN" 2>/dev/null || break
  [ "$(grep -c '| train_inner |' "$LOG")" -ge 8 ] && break
done
kill -- -"$TRAIN" 2>/dev/null; wait "$TRAIN" 2>/dev/null  # setsid: the job's own process group
grep -q '| train_inner |' "$LOG" || { echo "jam_cross fsdp: no update logged, see $LOG"; tail -20 "$LOG"; }

# ---- 2. HF OPT-1.3B, same tokens per step; then the table ----------------------------------------------
timeout 240 "$PY" - "$LOG" "$CROSS" "$T" "$PEAK" <<'PY' 2>&1 | tee "$OUT/train_table.txt"
import json, math, statistics, sys, time
import torch
from jam_metaseq.fusion import state_shapes
from jam_metaseq.models.config import cross_of, preset
from jam_metaseq.vocab import VocabManifest

log, cross_every, T, peak = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]) * 1e12

def matmul_params(shapes):  # 2-D weights but position tables; the tied output projection once
    return sum(math.prod(s) for k, s in shapes.items()
               if len(s) == 2 and "embed_positions" not in k and k != "decoder.output_projection.weight")

vocab = VocabManifest(text_size=50000, image_codes=8192, num_sentinels=16, image_tokens_per_image=1024,
                      image_grid=(32, 32))  # the data's (above)
parent = preset("opt_1_3b", vocab_size=vocab.size)
cross = cross_of(parent, cross_every, image_vocab_start=vocab.image_start, image_vocab_end=vocab.image_end)
shapes = state_shapes(cross)
E = parent.embed_dim
jam_flops = 6 * matmul_params(shapes) + 12 * (2 * parent.layers + 2 * len(cross.cross_after)) * T * E
rows = []
wps = [float(json.loads(l.split("| train_inner |", 1)[1])["wps"]) for l in open(log) if "| train_inner |" in l]
if len(wps) >= 3:
    tok_s = statistics.median(wps[2:])
    params = sum(math.prod(s) for k, s in shapes.items() if k != "decoder.output_projection.weight")
    rows.append(("jam_cross_1_3b fully_sharded (metaseq)", params, tok_s, tok_s * jam_flops / peak))

try:
    from transformers import OPTConfig, OPTForCausalLM
    cfg = OPTConfig(vocab_size=50272, hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                    max_position_embeddings=2048, word_embed_proj_dim=2048, do_layer_norm_before=True)
    model = OPTForCausalLM(cfg).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, 50272, (1, T), device="cuda")
    times = []
    for i in range(25):
        torch.cuda.synchronize(); t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 5:
            times.append(time.perf_counter() - t)
    tok_s = T / statistics.median(times)
    hf_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    mm = sum(math.prod(s) for n, s in hf_shapes.items() if len(s) == 2 and "embed_positions" not in n)
    hf_flops = 6 * mm + 12 * cfg.num_hidden_layers * T * cfg.hidden_size
    rows.append(("HF OPTForCausalLM opt-1.3b (torch)", sum(p.numel() for p in model.parameters()), tok_s,
                 tok_s * hf_flops / peak))
except Exception as e:  # the table still prints the jam row
    print(f"HF OPT-1.3B: failed: {e!r}")

print(f"{'run':42} {'params':>10} {'tokens/s':>10} {'MFU':>6}")
for name, n, tok_s, mfu in rows:
    print(f"{name:42} {n / 1e9:9.2f}B {tok_s:10.0f} {mfu:6.1%}")
if len(rows) == 2:
    print(f"jam/HF tokens/s: {rows[0][2] / rows[1][2]:.2f}  (FLOPs per token jam/HF: {jam_flops / hf_flops:.2f})")
PY

# ---- 3. decode at 7B against the memory-bandwidth bound -------------------------------------------------
timeout 300 "$PY" benchmarks/bench_generate.py --device cuda --dtype bfloat16 --shapes cm3leon_7b --batch 1,8 \
  --image-tokens 256 --modes static,graph --no-hf 2>&1 | tee "$OUT/decode_7b.txt"
echo "results: $OUT"
