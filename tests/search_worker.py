"""Subprocess worker for the kill-and-resume test: search toy examples on a tiny random model into a JSONL."""
import sys
import time

import torch

from retrofit.search.mcts import MCTSConfig
from retrofit.search.run import search_examples
from retrofit.testing import tiny_model
from retrofit.testing.search_toys import CharTokenizer, toy_examples

if __name__ == "__main__":
    out, n, slow = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    torch.set_num_threads(1)
    model = tiny_model("llama", seed=0, initializer_range=0.5)
    tok = CharTokenizer(model.config.vocab_size)
    examples = toy_examples(n)
    cfg = MCTSConfig(simulations=12, batch=4)
    if slow:  # give the parent time to kill us between examples
        from retrofit.search import evaluator as E
        orig = E.PlanEvaluator.set_example

        def slow_set(self, ex):
            time.sleep(slow)
            return orig(self, ex)
        E.PlanEvaluator.set_example = slow_set
    search_examples(model, tok, examples, out, cfg=cfg, budget=1.0, seed=7, progress=False, task="toy")
