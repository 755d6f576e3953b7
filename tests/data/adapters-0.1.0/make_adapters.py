"""Save one tiny adapter per method with main's code (format compatibility fixtures)."""
import json
import sys

sys.path.insert(0, ".")
import lorakit
from tests.conftest import batch_for, output_of, tiny_llama

out = sys.argv[1]
opts = {"lora": {"r": 2}, "dora": {"r": 2}, "lora-fa": {"r": 2}, "vera": {"r": 4},
        "rank1-sum": {"r_init": 3, "target_rank": 2}, "delta-lora": {"r": 2, "delta_start": 0},
        "lora-xs": {"r": 2}, "lora-sb": {"r": 2}, "full": {"targets": ["lm_head"]}}
expected = {}
for method, o in opts.items():
    model = tiny_llama(seed=0, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=32)
    batch = batch_for(model)
    rt = {"init_batches": [batch]} if method == "lora-sb" else {}
    targets = {} if method == "full" else {"targets": ["q_proj", "v_proj", "down_proj"]}
    lorakit.attach(model, method, **o, **targets, **rt)
    opt = lorakit.optimizer(model, 1e-2, loraplus_ratio=None)
    cbs = lorakit.training_callbacks(model, opt, total_steps=4)
    model.train()
    for _ in range(3):
        loss = cbs.regularize(model(**batch).loss); loss.backward(); cbs.before_step(); opt.step(); cbs.step(); opt.zero_grad()
    model.eval()
    lorakit.save(model, f"{out}/{method}")
    expected[method] = output_of(model, batch)[0, :4, :6].tolist()
json.dump(expected, open(f"{out}/expected_logits.json", "w"), indent=1)
