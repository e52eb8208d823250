"""metagate's agent switches (issue 13): the additive agent composes known factor values and can select a
band of one context number, which the bias-free MLP cannot; the regulariser and the consolidation see a
fixed number of stored masks per step (cost flat in the number of tasks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metagate.config import ConfigError, config_from_dict
from metagate.data import build_stream
from metagate.methods import create_method
from metagate.methods.base import Batch
from metagate.methods.metagate import AdditiveAgent, MetaAgent
from metagate.methods.metagate.contexts import ContextRange
from metagate.nn.gates import standardise, topk_mask
from metagate.identity import same_run
from metagate.train import task_seed

BENCH = {"name": "composed_teacher", "num_tasks": 6, "factors": 2, "values": 4, "units_per_group": 4, "novel_tasks": 0, "min_value_tasks": 1,
         "train_per_task": 200, "test_per_task": 50}


def make(**method):  # noqa: ANN003, ANN201
    cfg = config_from_dict({"benchmark": BENCH, "method": {"name": "metagate", "backbone": {"hidden": [32]}, **method}})
    stream = build_stream(cfg.benchmark, 0)
    torch.manual_seed(task_seed(0, -1))
    return create_method(cfg.method, stream, cfg.trainer, torch.device("cpu")), stream


def fit(agent: torch.nn.Module, contexts: torch.Tensor, masks: torch.Tensor, steps: int = 600) -> None:
    opt = torch.optim.Adam(agent.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(agent(contexts), masks).backward()
        opt.step()


def test_the_additive_agent_is_a_sum_over_context_numbers() -> None:
    torch.manual_seed(0)
    agent = AdditiveAgent(3, 20, 16)
    with torch.no_grad():
        a, b = torch.tensor([[0.2, 0.7, 0.1]]), torch.tensor([[0.9, 0.7, 0.1]])
        a2, b2 = torch.tensor([[0.2, 0.3, 0.8]]), torch.tensor([[0.9, 0.3, 0.8]])
        # changing the first number moves every logit by the same amount whatever the others are
        torch.testing.assert_close(agent(b) - agent(a), agent(b2) - agent(a2))


def test_the_additive_agent_selects_a_band_of_one_number_and_the_bias_free_mlp_cannot() -> None:
    """Units on only for contexts near 0.5 (a step-function code's middle value): the bias-free MLP is
    positively homogeneous (f(2c) = 2 f(c)), so on positive contexts each unit's logit keeps one sign."""
    torch.manual_seed(0)
    contexts = torch.linspace(0.0, 1.0, 6)[1:].unsqueeze(1)  # 0.2, 0.4, ..., 1.0
    band = ((contexts - 0.6).abs() < 0.1).float().expand(-1, 8)  # on at 0.6 only
    additive, mlp, scale = AdditiveAgent(1, 8, 32), MetaAgent(1, 8, [32, 32]), ContextRange(1, torch.device("cpu"))
    scale.fit(contexts, torch.ones(len(contexts), dtype=torch.bool))  # the additive agent reads each number rescaled to [0, 1]
    fit(additive, scale(contexts), band)
    fit(mlp, contexts, band)
    with torch.no_grad():
        assert torch.equal((additive(scale(contexts)) > 0).float(), band)
        assert not torch.equal((mlp(contexts) > 0).float(), band)


def test_the_additive_agent_composes_unseen_combinations_far_better_than_the_nearest_context() -> None:
    """Masks that are unions of one unit group per (factor, value), 2 factors x 3 values, contexts v / 2 (the
    numeric code). Trained on the other combinations, the agent's masks for held-out ones are compared with
    the nearest trained context's mask (which differs in one factor: 8 wrong bits). Composition is not exact
    everywhere (at the ends of the range the signs are not pinned down by 7 or 8 examples), so the claim is
    that the agent gets a quarter or less of the lookup's wrong bits, over five held-out sets."""
    values, group = 3, 4
    combos = [(a, b) for a in range(values) for b in range(values)]

    def mask(a: int, b: int) -> torch.Tensor:
        m = torch.zeros(2 * values * group)
        m[a * group : (a + 1) * group] = 1
        m[(values + b) * group : (values + b + 1) * group] = 1
        return m

    ctx = lambda pairs: torch.tensor([[a / 2, b / 2] for a, b in pairs])  # noqa: E731
    wrong_agent = wrong_lookup = 0
    for unseen in ([(0, 2), (2, 1)], [(1, 0), (2, 2)], [(0, 1), (1, 2)], [(2, 2)], [(0, 0)]):
        torch.manual_seed(0)
        seen = [p for p in combos if p not in unseen]
        agent = AdditiveAgent(2, 2 * values * group, 32)  # the contexts span [0, 1]: read as they are
        fit(agent, ctx(seen), torch.stack([mask(*p) for p in seen]), steps=1000)
        truth = torch.stack([mask(*p) for p in unseen])
        with torch.no_grad():
            wrong_agent += int(((agent(ctx(unseen)) > 0).float() != truth).sum())
        nearest = torch.cdist(ctx(unseen), ctx(seen)).argmin(1)
        wrong_lookup += int((torch.stack([mask(*seen[i]) for i in nearest]) != truth).sum())
    assert wrong_lookup == 8 * 8  # 8 held-out combinations, each 8 bits off
    assert wrong_agent <= wrong_lookup / 4


def test_the_additive_agent_refuses_long_contexts_with_a_one_line_error() -> None:
    with pytest.raises(ValueError, match="method.agent=mlp"):
        AdditiveAgent(100, 10, 8)
    with pytest.raises(ConfigError):
        config_from_dict({"benchmark": BENCH, "method": {"name": "metagate", "agent": "sum"}})


@pytest.mark.parametrize(("k", "rows"), [(0, 1 + 4), (2, 1 + 2)])
def test_a_training_step_regularises_reg_batch_stored_masks(k: int, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    m, stream = make(agent="additive", agent_hidden=[16], reg_batch=k, consolidation_steps=2)
    for task in stream.tasks[:4]:
        m.before_task(task)
        m.train_step(Batch(task.x_train[:32], task.y_train[:32]), task)
        m.after_task(task)
    seen: list[int] = []
    original = m.logits
    monkeypatch.setattr(m, "logits", lambda slots: seen.append(len(slots)) or original(slots))
    task = stream.tasks[4]
    m.before_task(task)
    seen.clear()
    m.train_step(Batch(task.x_train[:32], task.y_train[:32]), task)
    assert seen == [rows]  # the current task and the stored ones regularised, in one agent call


@pytest.mark.parametrize(("k", "rows"), [(0, 3), (2, 2)])
def test_consolidation_fits_consolidation_batch_stored_masks_per_step(k: int, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    m, stream = make(consolidation_batch=k, consolidation_steps=5)
    for task in stream.tasks[:2]:
        m.before_task(task)
        m.after_task(task)
    seen: list[int] = []
    original = m.logits
    monkeypatch.setattr(m, "logits", lambda slots: seen.append(len(slots)) or original(slots))
    task = stream.tasks[2]
    m.before_task(task)
    seen.clear()
    m.after_task(task)
    assert seen == [1] + [rows] * 5  # the task's own final mask, then each consolidation step


def test_agent_every_updates_the_agent_once_per_window_with_the_accumulated_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """agent_every = 3: one agent forward and one agent step per 3 training steps, with the gradient of the
    mean task loss over the window (the mask fixed at the window's start) plus beta x the regulariser's."""
    m, stream = make(agent="additive", agent_hidden=[16], agent_every=3, reg_batch=0, consolidation_steps=2)
    for task in stream.tasks[:2]:
        m.before_task(task)
        m.train_step(Batch(task.x_train[:32], task.y_train[:32]), task)
        m.after_task(task)
    task = stream.tasks[2]
    m.before_task(task)
    monkeypatch.setattr(m.optimizer, "step", lambda: None)  # the target network stays put: the reference is simple
    batches = [Batch(task.x_train[32 * i : 32 * (i + 1)], task.y_train[32 * i : 32 * (i + 1)]) for i in range(3)]
    # the reference gradient, before any step: (1/3) sum_i d loss_i / d agent + beta * d reg / d agent
    slots = torch.cat([m.slots(task), m.stored.targets[0]])
    z = m.logits(slots)
    mask = topk_mask(z[0], m.widths, m.cfg.density)
    losses = [F.cross_entropy(m.mask_logits(m.model(b.x, unit_masks=list(mask.split(m.widths))), task, None), b.y) for b in batches]
    total = sum(losses) / 3 + m.cfg.beta * F.binary_cross_entropy_with_logits(z[1:], m.stored.targets[1])
    expected = torch.autograd.grad(total, list(m.agent.parameters()))
    steps: list[list[torch.Tensor]] = []
    original = m.agent_optimizer.step
    monkeypatch.setattr(m.agent_optimizer, "step", lambda: steps.append([p.grad.clone() for p in m.agent.parameters()]) or original())
    forwards: list[int] = []
    logits = m.logits
    monkeypatch.setattr(m, "logits", lambda s: forwards.append(len(s)) or logits(s))
    for i, b in enumerate(batches):
        m.train_step(b, task)
        assert len(steps) == (1 if i == 2 else 0)  # the agent moves on the window's last step only
    assert forwards == [3]  # one agent call (the task and the 2 stored) for the window
    for got, want in zip(steps[0], expected):
        torch.testing.assert_close(got, want)
    m.train_step(batches[0], task)  # a new window is open at the task's end: after_task closes it
    m.after_task(task)
    assert len(steps) == 1 + 1 + 2  # the first window, the one after_task closed, 2 consolidation steps


def stored_usage(m) -> torch.Tensor:  # noqa: ANN001
    """How many stored masks use each unit."""
    return m.stored.targets[1].sum(0)


def test_the_usage_prior_sends_a_new_task_to_the_units_stored_masks_use_least() -> None:
    """prior_kind=usage: with 5 masks stored, task 5's zero-shot mask takes units fewer stored masks use, and overlaps
    fewer of them, than with the random prior (same seed, same agent at the start); the default has no new buffer."""
    figures = {}
    for kind in ("random", "usage"):
        m, stream = make(prior_kind=kind, prior=1.0, density=0.25, consolidation_steps=20)
        for task in stream.tasks[:5]:
            m.before_task(task)
            m.train_step(Batch(task.x_train[:32], task.y_train[:32]), task)
            m.after_task(task)
        new = stream.tasks[5]
        m.before_task(new)
        mask, usage = m.zero_shot[new.index], stored_usage(m)
        overlapping = sum(bool((mask & m.stored[t.index].bool()).any()) for t in stream.tasks[:5])
        figures[kind] = (float(usage[mask].mean()), overlapping, float(usage.float().mean()))
        assert ("prior.fixed" in m.state_dict()) == (kind == "usage")
    (used_random, over_random, _), (used_usage, over_usage, mean_usage) = figures["random"], figures["usage"]
    assert used_usage < used_random and used_usage < mean_usage, figures
    assert over_usage <= over_random, figures


def test_a_task_keeps_the_usage_prior_it_started_with_and_untrained_tasks_follow_the_usage() -> None:
    """Each task's row of the usage prior (prior.fixed) is fixed when it starts (what the regulariser and the consolidation see for
    it later); an untrained task's (a later or held-out one) is std(-usage) + 0.1 r at the last task boundary, so a
    task's zero-shot evaluation after the previous task uses the very mask it then starts training with."""
    m, stream = make(prior_kind="usage", consolidation_steps=5)
    torch.testing.assert_close(m.prior.fixed, 0.1 * m.prior.random)  # nothing stored: the tie-break alone
    fixed: dict[int, torch.Tensor] = {}
    for task in stream.tasks[:4]:
        evaluated = m.unit_mask(task).clone()  # what the zero-shot evaluation after the previous task used
        m.before_task(task)
        assert torch.equal(m.zero_shot[task.index], evaluated)
        fixed[task.index] = m.prior.fixed[task.index].clone()
        m.train_step(Batch(task.x_train[:32], task.y_train[:32]), task)
        assert torch.equal(m.prior.fixed[task.index], fixed[task.index])  # no change inside the task
        m.after_task(task)
        for i, row in fixed.items():
            assert torch.equal(m.prior.fixed[i], row)  # stored tasks keep theirs
        want = standardise(-stored_usage(m), m.widths) + 0.1 * m.prior.random
        for slot in [*range(task.index + 1, stream.num_tasks), *range(stream.num_tasks, m.prior.fixed.shape[0])]:
            torch.testing.assert_close(m.prior.fixed[slot], want[slot])
    assert not torch.equal(fixed[0], fixed[3])  # the usage changed what later tasks start with
    z = m.agent(m.agent_input(m.slot_ids[:1]))
    torch.testing.assert_close(m.logits(m.slot_ids[:1]), standardise(z, m.widths) + m.cfg.prior * fixed[0].unsqueeze(0))


def test_the_default_random_prior_is_unchanged_by_the_switch() -> None:
    """prior_kind=random (the default): the logits are the standardised agent's plus prior x the task's random score
    at every point of a run, and no buffer is added (checkpoints of earlier runs load as before)."""
    m, stream = make(consolidation_steps=5)
    assert m.cfg.prior_kind == "random" and not hasattr(m.prior, "fixed")
    for task in stream.tasks[:3]:
        m.before_task(task)
        m.train_step(Batch(task.x_train[:32], task.y_train[:32]), task)
        m.after_task(task)
        with torch.no_grad():
            z = m.agent(m.agent_input(m.slot_ids))
            want = torch.cat([(c - c.mean(-1, keepdim=True)) / c.std(-1, keepdim=True).clamp_min(1e-6) for c in z.split(m.widths, -1)], -1)
            assert torch.equal(m.logits(m.slot_ids), want + m.cfg.prior * m.prior.random)


@pytest.mark.parametrize("prior_kind", ["usage", "repel"])
def test_a_resumed_run_with_the_usage_prior_equals_an_uninterrupted_one(prior_kind: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from conftest import whole_and_resumed

    raw = {"seed": 0, "benchmark": BENCH, "method": {"name": "metagate", "backbone": {"hidden": [32]}, "prior_kind": prior_kind,
           "prior": 0.5, "agent": "additive", "agent_hidden": [16], "reg_batch": 2, "consolidation_batch": 2, "consolidation_steps": 10},
           "trainer": {"epochs": 1, "progress": False}}
    whole, resumed = whole_and_resumed(raw, tmp_path, monkeypatch, stop_at=3)
    for key in ("acc_matrix", "val_acc_matrix", "heldout_acc_matrix", "zero_shot_acc", "mask_overlap", "agent_mask_reproduction"):
        assert whole[key] == resumed[key], key


def test_the_repel_prior_keeps_units_of_related_tasks_and_pushes_away_from_unrelated_ones() -> None:
    """prior_kind=repel: each stored mask counts in a task's usage with the fraction of context numbers in which the two
    tasks differ. Task 0 stored with task 2's very context, task 1 with one that differs in every number, on disjoint
    units: task 2's score favours task 0's units over task 1's (usage scores them alike); a task sharing one of the
    two numbers with task 1 counts its mask with weight 1/2; trained rows stay fixed, untrained rows follow."""
    scores = {}
    for kind in ("usage", "repel"):
        m, stream = make(prior_kind=kind, prior=1.0, consolidation_steps=5)
        assert "prior.fixed" in m.state_dict()
        c = m.contexts.clone()
        c[0] = c[2]  # the same context as task 2
        c[1] = c[2] + 1.0  # every number differs from task 2's
        c[3] = torch.stack([c[2, 0] - 0.5, c[1, 1]])  # the second number as task 1's, the first differs from both
        m.contexts.copy_(c)
        width = m.widths[0]
        same, distant = torch.zeros(width, dtype=torch.bool), torch.zeros(width, dtype=torch.bool)
        same[:4], distant[4:8] = True, True
        for i, mask in ((0, same), (1, distant)):
            m.stored.store(i, mask)
        before = m.prior.fixed[:2].clone()
        m._update_prior()
        assert torch.equal(m.prior.fixed[:2], before)  # trained rows stay as they were
        row = m.prior.fixed[2] - 0.1 * m.prior.random[2]  # the usage part alone
        scores[kind] = (row[same], row[distant])
        if kind == "repel":
            w = m.prior.weights(m.context_range(m.contexts), m.stored.targets[0])
            torch.testing.assert_close(w[2], torch.tensor([0.0, 1.0]))
            torch.testing.assert_close(w[3], torch.tensor([1.0, 0.5]))
            want = standardise(-(w @ m.stored.targets[1]), m.widths)
            torch.testing.assert_close(m.prior.fixed[2:], (want + 0.1 * m.prior.random)[2:])
    (same_u, distant_u), (same_r, distant_r) = scores["usage"], scores["repel"]
    torch.testing.assert_close(same_u, distant_u)  # usage: both used once
    assert same_r.min() > distant_r.max(), scores  # repel: the related task's units are not pushed away
    m.before_task(stream.tasks[2])
    z = m.zero_shot[2]
    assert int((z[:width] & distant).sum()) <= int((z[:width] & same).sum())


def test_the_context_range_spans_the_given_rows_and_leaves_a_single_value_unscaled() -> None:
    scale = ContextRange(2, torch.device("cpu"))
    c = torch.tensor([[0.2, 0.5], [0.6, 0.5], [5.0, 0.0]])
    scale.fit(c, torch.tensor([False, False, False]))  # nothing known: the contexts as they are
    assert torch.equal(scale(c), c)
    scale.fit(c, torch.tensor([True, True, False]))  # the third row is not known: it falls outside [0, 1]
    torch.testing.assert_close(scale(c), torch.tensor([[0.0, 0.0], [1.0, 0.0], [12.0, -0.5]]))  # one value of the second: shifted


def test_no_context_of_a_task_not_trained_yet_shapes_the_masks() -> None:
    """Issue 25's protocol: the additive agent's rescaling and the repel prior read only the contexts of trained tasks.
    A stream whose last task's context lies far outside the others': after training task 0, the agent, task 0's
    zero-shot, stored and generated masks, every other task's mask and prior row are the same as with its usual one."""
    runs = []
    for far in (False, True):
        cfg = config_from_dict({"benchmark": BENCH, "method": {"name": "metagate", "backbone": {"hidden": [32]}, "agent": "additive",
                                                            "agent_hidden": [16], "prior_kind": "repel", "consolidation_steps": 5}})
        stream = build_stream(cfg.benchmark, 0)
        last = stream.num_tasks - 1
        if far:
            stream.tasks[last].context.add_(100.0)  # known from the start, as a stream's contexts are
        torch.manual_seed(task_seed(0, -1))
        m = create_method(cfg.method, stream, cfg.trainer, torch.device("cpu"))
        task = stream.tasks[0]
        m.before_task(task)
        m.train_step(Batch(task.x_train[:32], task.y_train[:32]), task)
        m.after_task(task)
        others = [t for t in stream.tasks if t.index != last]
        with torch.no_grad():
            masks = torch.stack([m.unit_mask(t) for t in others] + [m.generated_mask(task).bool(), m.zero_shot[0]])
        rows = torch.cat([m.prior.fixed[:last], m.prior.fixed[last + 1 :]])
        runs.append((masks, rows, [p.detach().clone() for p in m.agent.parameters()]))
    (masks, rows, params), (far_masks, far_rows, far_params) = runs
    assert torch.equal(masks, far_masks)
    assert torch.equal(rows, far_rows)
    assert all(torch.equal(a, b) for a, b in zip(params, far_params))


def test_a_removed_switch_is_refused_and_a_saved_config_with_it_off_reads_as_today() -> None:
    """free_quota and si_relatedness were removed (validation rejected them, docs/metagate.md): a value that turns one
    on is refused with a one-line error naming the key; a run written before the removal holds them at 0 (every
    default was saved) and reads as the same run as today's config."""
    for key, value in (("free_quota", 0.25), ("si_relatedness", 3.0)):
        with pytest.raises(ConfigError, match=f"method.{key} was removed"):
            config_from_dict({"benchmark": BENCH, "method": {"name": "metagate", key: value}})
    today = config_from_dict({"benchmark": BENCH, "method": {"name": "metagate"}}).to_dict()
    saved = {**today, "method": {**today["method"], "free_quota": 0.0, "si_relatedness": 0.0}}
    assert same_run(saved, today)
