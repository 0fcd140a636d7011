#!/usr/bin/env bash
# Tiny Llama 3.1 pretraining on this CPU through the real 405B recipe code,
# on real English text (Debian's fortunes, see data_prep/english_corpus.py)
# with a SentencePiece tokenizer trained here: prints loss per step and
# writes a checkpoint under runs/. Creates .venv/ first if it is missing;
# what it prepares stays in data/ and is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
py=${PYTHON:-.venv/bin/python}
data=data/english
tokenizer=sentencepiece:$data/spm1024.model
"$py" -m data_prep.english_corpus --output "$data"
[[ -f $data/spm1024.model ]] || "$py" -m data_prep.train_tokenizer --vocab-size 1024 \
  --input "$data/fortunes-train.txt" --output "$data/spm1024"
"$py" -m data_prep.tinystories --input "$data" --tokenizer "$tokenizer" \
  --output "$data/indexed"
run_dir=runs/demo-$(date +%Y%m%d-%H%M%S)
"$py" recipes/llama31_405b.py --cpu --size debug --max-steps 30 --dir "$run_dir" --no-mlperf \
  --data "$data/indexed/train" --tokenizer "$tokenizer" "$@"
echo "checkpoints: $(ls -d "$run_dir"/*/checkpoints/*/ 2>/dev/null | tr '\n' ' ')"
