"""metagate's few-shot measurement (issue 13), several settings side by side in one training run: the measurement
does not change training, so every (n, steps, lr) sees the same network and agent at each task and the same examples'
generator state. Per task, the accuracy on SPLIT (val or test) with the mask each setting infers is written to
OUT/grid.json; the run itself (``metagate run``'s folder) records the setting passed as STEPS LR (n = 32; default: the Config's).

    PYTHONPATH=src python experiments/few_shot_grid.py OUT SEED SPLIT CONTEXT_MODE GRID [STEPS LR]

GRID is ``n:steps:lr,...``. The settings are the benchmark's metagate-repel row (experiments/metagate_benchmarks.py).
Validation (tuning seeds 1000-1001): ``... OUT 1000 val given 32:10:0.01,32:25:0.01,32:50:0.01,...``; test (seeds
0-2), given and shuffled contexts: ``... OUT 0 test given 8:50:0.01,32:50:0.01,128:50:0.01,512:50:0.01 50 0.01``.
"""
import json, sys, time
import torch
from metagate.config import load_config
from metagate.methods.metagate import MetaGate
from metagate.runs import RunDir
from metagate.train import Trainer, evaluate

out, seed, split, mode, grid = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
GRID = [tuple(float(v) if "." in v else int(v) for v in g.split(":")) for g in grid.split(",")]
overrides = """method.name=metagate method.backbone.kind=mlp method.backbone.dropout=0.0 method.backbone.hidden=[209]
trainer.curve_every=10 reference=null trainer.progress=false method.density=0.158 method.agent=additive
method.agent_hidden=[64] method.reg_batch=32 method.consolidation_batch=64 method.c=0.1 method.xi=0.01 method.prior=1.0
method.prior_kind=repel method.few_shot=32""".split()  # steps and lr: the Config's (chosen on validation) unless given
extra = [f"method.few_shot_steps={sys.argv[6]}", f"method.few_shot_lr={sys.argv[7]}"] if len(sys.argv) > 7 else []
cfg = load_config("composed-teacher", overrides + [f"seed={seed}", f"method.context_mode={mode}", *extra])
rows = []
original = MetaGate.few_shot


def measured(self, task, generator):
    state, base, row = generator.get_state(), self.cfg, {}
    for n, steps, lr in GRID:
        self.cfg = base.model_copy(update={"few_shot": n, "few_shot_steps": steps, "few_shot_lr": lr})
        gen = torch.Generator(device=generator.device)
        gen.set_state(state)
        try:
            mask = self.few_shot_mask(task, gen)
        finally:
            self.cfg = base
        self._mask_override = (task.index, mask.float())
        try:
            row[f"{n}:{steps}:{lr}"] = evaluate(self, [task], 2048, split)[0]
        finally:
            self._mask_override = None
    rows.append(row)
    return original(self, task, generator)


MetaGate.few_shot = measured
t0 = time.time()
res = Trainer(cfg, RunDir.create(out)).fit()
json.dump({"split": split, "grid": [list(g) for g in GRID], "rows": rows}, open(f"{out}/grid.json", "w"))
print("done", out, time.time() - t0)
