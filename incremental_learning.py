"""
Incremental (continual) learning: train one model on task A, then B, then C, and keep what it learned on A.
Three mechanisms against catastrophic forgetting, each off at its neutral setting, and the metrics that show it:

- EWC (Kirkpatrick 2017): after a task, a diagonal Fisher F says how much each parameter mattered to it;
  training on later tasks adds λ·Σ F·(θ − θ*)², a spring that pulls the important parameters back to θ*.
  Kirkpatrick's form keeps one such penalty per earlier task, each at its own θ*; online EWC (Schwarz 2018)
  keeps one decayed sum of Fishers, F ← γ·F + F_new, anchored at the latest θ*. The importance F may also
  be Synaptic Intelligence's path integral (Zenke 2017) or Memory Aware Synapses' output sensitivity
  (Aljundi 2018), which turns the same penalty into SI or MAS.
- Replay (Rolnick 2019, Chaudhry 2019): a buffer of earlier tasks' training windows, filled by reservoir
  sampling over every window trained on, replaces replay_ratio·batch_size windows of each batch (in
  expectation: the fraction's remainder is one more window that often).
- Importance-adaptive learning rates: each parameter's update is scaled by 1/(1 + s·F/mean(F)), so the
  parameters that mattered to earlier tasks learn more slowly (s = adaptive_lr_strength), and the top
  protect_fraction of all elements by importance have their updates scaled by protect_scale (0: frozen).
- Metrics: R[i][j] = validation loss on task j after training stage i (fixed windows, evaluate.py),
  forgetting per task and backward transfer.

Tasks are data_dir/{task}_train.bin and {task}_val.bin over one vocabulary (data/continual_char). A stage is
one task ('A,B,C': three stages) or several mixed in equal shares ('A+B': joint training, the upper bound).
Each stage runs iters_per_task iterations (the first may run first_stage_iters, to converge) with its own
warm-up and cosine decay, stretched to its length (re-warming, Ibrahim 2024),
its peak lowered by stage_lr_peak after the first stage, or none: stage_lr_schedule='constant' keeps min_lr.
"""

import bisect
import itertools
import os
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from evaluate import evaluate_loss


def parse_stages(spec):
    """'A,B,C' -> [('A',), ('B',), ('C',)]; 'A+B' -> [('A', 'B')], one stage that mixes A and B."""
    stages = [tuple(t.strip() for t in stage.split('+')) for stage in spec.split(',')]
    if any(not t for stage in stages for t in stage):
        raise ValueError(f"incremental_tasks={spec!r}: use task names separated by ',' (in order) or '+' (mixed), e.g. 'A,B,C'")
    return stages


def task_files(spec):
    """The data files a task sequence reads, for tokenizer.ensure_prepared."""
    tasks = dict.fromkeys(t for stage in parse_stages(spec) for t in stage)
    return tuple(f'{t}_{split}.bin' for t in tasks for split in ('train', 'val'))


def read_windows(data, starts, block_size):
    """Token windows (len(starts), block_size + 1) of a 1-D uint16 array: inputs w[:, :-1], targets w[:, 1:]."""
    return torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in starts]).astype(np.int64))


def split_evenly(n, k):
    """n items in k near-equal shares, the first ones one larger: split_evenly(12, 5) = [3, 3, 2, 2, 2]."""
    return [n // k + (i < n % k) for i in range(k)]


def estimate_fisher(model, batches, generator):
    """Diagonal Fisher information {name: tensor shaped like the parameter}, per token, over batches of
    inputs x (B, T).

    The true Fisher: labels ŷ are sampled from the model's own predictive distribution p_θ(·|x), not
    taken from the data (the empirical Fisher). The true Fisher is the curvature that EWC's Laplace
    approximation stands for; the empirical one is a different matrix that shrinks toward zero as the
    model fits its data (Kunstner 2019, Martens 2020). Sampled labels also make the estimate cheap: each
    token's score g_t = ∇ log p(ŷ_t | x_≤t) has mean zero over its own ŷ_t, and the ŷ_t are drawn
    independently, so the cross terms of (Σ_t g_t)² vanish in expectation and one backward pass of the
    summed log-likelihood of a batch estimates Σ_t E[g_t²] without bias. With data labels Σ_t g_t is the
    loss gradient, which is near zero at a minimum, so this shortcut works only for the true Fisher."""
    was_training = model.training
    model.eval()  # the model's distribution without dropout
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    tokens = 0
    for x in batches:
        with torch.enable_grad():
            logits = model(x, x)[0].float()  # (B, T, V); targets only make it return every position's logits
            log_probs = F.log_softmax(logits, dim=-1)
            y = torch.multinomial(log_probs.detach().exp().view(-1, logits.size(-1)), 1, generator=generator)  # (B*T, 1)
            log_likelihood = log_probs.view(-1, logits.size(-1)).gather(1, y).sum()
            grads = torch.autograd.grad(log_likelihood, list(params.values()), allow_unused=True)
        for f, g in zip(fisher.values(), grads):
            if g is not None:
                f += g.float() ** 2
        tokens += y.numel()
    model.train(was_training)
    return {n: f / tokens for n, f in fisher.items()}


def estimate_mas(model, batches):
    """Memory Aware Synapses' importance (Aljundi 2018) {name: tensor shaped like the parameter}: the mean over
    batches of |∇ mean_t ||p_θ(·|x_≤t)||²|, how much the model's output moves with each parameter; no labels.
    The output is the softmax, not the logits: a shift of every logit changes their norm but no prediction."""
    was_training = model.training
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    mas = {n: torch.zeros_like(p) for n, p in params.items()}
    for x in batches:
        with torch.enable_grad():
            probs = F.softmax(model(x, x)[0].float(), dim=-1)  # (B, T, V)
            grads = torch.autograd.grad(probs.pow(2).sum(-1).mean(), list(params.values()), allow_unused=True)
        for m, g in zip(mas.values(), grads):
            if g is not None:
                m += g.float().abs()
    model.train(was_training)
    return {n: m / len(batches) for n, m in mas.items()}


def ewc_penalty(model, anchor, fisher):
    """Σ_i F_i·(θ_i − θ*_i)², a scalar tensor. No 1/2: Kirkpatrick's λ/2 is our λ, so that the training
    loss adds λ·Σ F·(θ − θ*)² and its gradient is 2λ·F·(θ − θ*)."""
    return sum((fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in fisher)


class ReplayBuffer:
    """A uniform sample of every training window offered so far, kept by reservoir sampling (Vitter's
    algorithm R): the first `size` windows fill the buffer, the n-th after that (n counted from 1 over
    all windows offered) replaces a random slot with probability size/n, so each window offered is in the
    buffer with the same probability size/seen. Windows (size, T + 1) and their task ids live in tensors,
    its random state beside them: state_dict() goes into the checkpoint. balance: how replayed windows are drawn,
    uniformly over the eligible 'windows' (a task that trained longer is replayed more), or over 'tasks' first
    (each earlier task an equal share, as joint training mixes its datasets)."""

    def __init__(self, size, window, seed, balance='windows'):
        self.windows = torch.zeros(size, window, dtype=torch.int64)  # (size, T + 1)
        self.tasks = torch.full((size,), -1, dtype=torch.int64)  # task index of each slot, -1: empty
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.by_task = balance == 'tasks'

    def add(self, windows, task):
        size = len(self.windows)
        for w in windows:
            slot = self.seen if self.seen < size else torch.randint(self.seen + 1, (1,), generator=self.generator).item()
            if slot < size:
                self.windows[slot], self.tasks[slot] = w, task
            self.seen += 1

    def sample(self, n, exclude, generator):
        """n windows (n, T + 1) drawn with replacement among those of tasks not in exclude (the tasks being
        trained now), uniformly or each task an equal share in expectation; none when the buffer holds no such window."""
        eligible = torch.nonzero((self.tasks >= 0) & ~torch.isin(self.tasks, torch.tensor(exclude))).flatten()
        if len(eligible) == 0:
            return self.windows[:0]
        if not self.by_task:
            return self.windows[eligible[torch.randint(len(eligible), (n,), generator=generator)]]
        groups = [eligible[self.tasks[eligible] == t] for t in self.tasks[eligible].unique()]  # slots per task
        task_of_draw = torch.randint(len(groups), (n,), generator=generator)
        picks = [g[torch.randint(len(g), (int((task_of_draw == i).sum()),), generator=generator)]
                 for i, g in enumerate(groups)]
        return self.windows[torch.cat(picks)]

    def state_dict(self):
        return dict(windows=self.windows, tasks=self.tasks, seen=self.seen, rng=self.generator.get_state())

    def load_state_dict(self, state):
        self.windows, self.tasks, self.seen = state['windows'], state['tasks'], state['seen']
        self.generator.set_state(state['rng'])


def forgetting(R, learned):
    """{task column j: forgetting} for each task learned before the last stage (Chaudhry 2018, on losses):
    its final loss minus the best loss it had at any earlier stage since it was learned. > 0: forgotten."""
    last = len(R) - 1
    return {j: R[last][j] - min(R[i][j] for i in range(s, last)) for j, s in enumerate(learned) if s < last}


def backward_transfer(R, learned):
    """Mean over the tasks learned before the last stage of (loss right after learning it − final loss):
    the sign of GEM's BWT (Lopez-Paz 2017), negative when later stages made earlier tasks worse. None if
    no task was learned before the last stage (a single stage, e.g. joint training)."""
    last = len(R) - 1
    deltas = [R[s][j] - R[last][j] for j, s in enumerate(learned) if s < last]
    return sum(deltas) / len(deltas) if deltas else None


def format_report(tasks, stages, R, learned):
    """The R matrix, forgetting and backward transfer as a text table."""
    lines = ["R[i][j]: val loss (nats/token) on task j after stage i",
             "after  " + "".join(f"{t:>9}" for t in tasks)]
    for stage, row in zip(stages, R):
        lines.append(f"{'+'.join(stage):<7}" + "".join(f"{v:9.4f}" for v in row))
    f = forgetting(R, learned)
    if f:
        lines.append("forgetting " + ", ".join(f"{tasks[j]} {v:+.4f}" for j, v in f.items()) +
                     f"; backward transfer {backward_transfer(R, learned):+.4f}")
    return "\n".join(lines)


class IncrementalLearner:
    """The task sequence a training run follows, and what it keeps between tasks (the importance, EWC's
    anchors, the replay buffer, the R matrix). train_efficient.py calls, per iteration: lr, train_batch,
    aux_losses (added to the loss), scaled_update (around the optimizer step) and after_step; its loss
    estimates call get_batch."""

    def __init__(self, data_dir, meta, config, device='cpu'):
        c = config
        self.stages = parse_stages(c['incremental_tasks'])
        self.tasks = list(dict.fromkeys(t for stage in self.stages for t in stage))  # the R matrix's columns
        known = list(meta.get('tasks', {}))
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            have = ', '.join(known) or "none (its meta.json lists no 'tasks')"
            raise ValueError(f"incremental_tasks names {', '.join(unknown)}, but {data_dir} has tasks: {have}")
        uses_importance = c['ewc_lambda'] > 0 or c['adaptive_lr_strength'] > 0 or c['protect_fraction'] > 0
        checks = [(c['iters_per_task'] > 0, "iters_per_task must be > 0"),
                  (c['first_stage_iters'] >= 0, "first_stage_iters must be >= 0 (0: iters_per_task)"),
                  (c['ewc_lambda'] >= 0, "ewc_lambda must be >= 0"),
                  (0 <= c['ewc_gamma'] <= 1, "ewc_gamma must be in [0, 1]"),
                  (c['ewc_mode'] in ('online', 'per_task'), f"ewc_mode must be 'online' or 'per_task', not {c['ewc_mode']!r}"),
                  (c['ewc_mode'] == 'online' or c['ewc_gamma'] == 1, "ewc_gamma applies to ewc_mode='online' only"),
                  (c['importance'] in ('fisher', 'mas', 'si'), f"importance must be 'fisher', 'mas' or 'si', not {c['importance']!r}"),
                  (0 <= c['replay_ratio'] < 1, "replay_ratio must be in [0, 1)"),
                  (c['replay_buffer_size'] >= 0 and c['fisher_batches'] >= 0, "replay_buffer_size and fisher_batches must be >= 0"),
                  (c['adaptive_lr_strength'] >= 0, "adaptive_lr_strength must be >= 0"),
                  (0 <= c['protect_fraction'] < 1 and 0 <= c['protect_scale'] <= 1,
                   "protect_fraction must be in [0, 1) and protect_scale in [0, 1]"),
                  (c['stage_lr_schedule'] in ('rewarm', 'constant'),
                   f"stage_lr_schedule must be 'rewarm' or 'constant', not {c['stage_lr_schedule']!r}"),
                  (c['stage_lr_peak'] > 0, "stage_lr_peak must be > 0"),
                  (c['replay_ratio'] == 0 or c['replay_buffer_size'] > 0, "replay_ratio > 0 needs replay_buffer_size > 0"),
                  (c['replay_balance'] in ('windows', 'tasks'),
                   f"replay_balance must be 'windows' or 'tasks', not {c['replay_balance']!r}"),
                  (c['fisher_batches'] > 0 or c['importance'] == 'si' or not uses_importance,
                   f"ewc_lambda, adaptive_lr_strength and protect_fraction need importance={c['importance']!r} "
                   "measured: set fisher_batches > 0 (or importance='si', measured during training)")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.data_dir, self.device, self.config = data_dir, device, c
        self.iters_per_task = c['iters_per_task']
        self.stage_iters = [c['first_stage_iters'] or self.iters_per_task] + [self.iters_per_task] * (len(self.stages) - 1)
        self.ends = list(itertools.accumulate(self.stage_iters))  # the iteration at which each stage ends
        self.max_iters = self.ends[-1]
        self.block_size, self.batch_size = c['block_size'], c['batch_size']
        self.ewc_lambda, self.ewc_gamma, self.fisher_batches = c['ewc_lambda'], c['ewc_gamma'], c['fisher_batches']
        self.adaptive_lr_strength = c['adaptive_lr_strength']
        # an importance is measured after each stage when anything uses it (or, for the Fisher and MAS, when asked)
        self.measures = uses_importance or (c['fisher_batches'] > 0 and c['importance'] != 'si')
        self.replay_windows = round(c['replay_ratio'] * self.batch_size, 6)  # per batch, in expectation
        # windows per R entry: None for the whole split; with final_eval_windows=0 no R matrix is measured
        self.eval_windows = None if c['final_eval_windows'] < 0 else c['final_eval_windows']
        for task in self.tasks:
            for split in ('train', 'val'):
                tokens = os.path.getsize(os.path.join(data_dir, f'{task}_{split}.bin')) // 2
                if tokens <= self.block_size:
                    raise ValueError(f"{task}_{split}.bin of {data_dir} has {tokens:,} tokens, too few for one window of "
                                     f"block_size={self.block_size} (that needs block_size + 1)")
        self.buffer = ReplayBuffer(c['replay_buffer_size'], self.block_size + 1, c['seed'], c['replay_balance']) \
            if c['replay_buffer_size'] else None
        self.stage, self.R, self.diagnostics = 0, [], []
        # importance: the γ-decayed sum over finished stages (adaptive lr, protection); terms: EWC's (anchor,
        # importance) pairs, one per earlier stage (per_task) or one (online); si: the running path integral
        self.importance, self.terms, self.update_scale = None, [], None
        self.si_omega, self.si_start = None, None

    def data(self, task, split):
        return np.memmap(os.path.join(self.data_dir, f'{task}_{split}.bin'), dtype=np.uint16, mode='r')

    def lr(self, iter_num, schedule):
        """The learning rate at iter_num: schedule(it) (warm-up and decay over iters_per_task) restarted every
        stage, stretched to a longer first stage. After the first stage, 'rewarm' lowers its peak to
        stage_lr_peak·learning_rate (min_lr stays), 'constant' stays at min_lr: no re-warming (Ibrahim 2024's
        baseline)."""
        stage = min(bisect.bisect_right(self.ends, iter_num), len(self.stages) - 1)
        it = (iter_num - ([0] + self.ends)[stage]) * self.iters_per_task / self.stage_iters[stage]
        if stage == 0:
            return schedule(it)
        min_lr = self.config['min_lr']
        if self.config['stage_lr_schedule'] == 'constant':
            return min_lr
        return min_lr + self.config['stage_lr_peak'] * (schedule(it) - min_lr)

    def stage_windows(self, split, n, generator):
        """[(task index, windows (k, T + 1))]: n random windows of the current stage, its tasks in equal shares."""
        out = []
        for task, k in zip(self.stages[self.stage], split_evenly(n, len(self.stages[self.stage]))):
            data = self.data(task, split)
            starts = torch.randint(len(data) - self.block_size, (k,), generator=generator)
            out.append((self.tasks.index(task), read_windows(data, starts, self.block_size)))
        return out

    def xy(self, windows):
        return windows[:, :-1].contiguous().to(self.device), windows[:, 1:].contiguous().to(self.device)  # (B, T) each

    def get_batch(self, split, generator):
        """(x, y) of the current stage, for evaluation: no replay, nothing offered to the buffer."""
        return self.xy(torch.cat([w for _, w in self.stage_windows(split, self.batch_size, generator)]))

    def replay_count(self, generator):
        """Windows to replay in this batch: none in the first stage; then replay_ratio·batch_size, its whole part
        always and its remainder as one more window that often (0.01 of 12 is 0.12: a window in about one batch in
        eight). A whole number draws nothing, so such a run keeps its random stream."""
        if self.stage == 0 or not self.replay_windows:
            return 0
        whole, part = divmod(self.replay_windows, 1)
        return int(whole) + int(part > 0 and torch.rand(1, generator=generator).item() < part)

    def train_batch(self, generator):
        """(x, y) for a training step: the current stage's windows, then replay_count windows from the buffer
        once it holds an earlier task's (none during the first task). The new windows go to the buffer."""
        stage = [self.tasks.index(t) for t in self.stages[self.stage]]
        n = self.replay_count(generator)
        replayed = self.buffer.sample(n, stage, generator) if n else None
        new = self.stage_windows('train', self.batch_size - (len(replayed) if replayed is not None else 0), generator)
        if self.buffer:
            for task, windows in new:
                self.buffer.add(windows, task)
        return self.xy(torch.cat([w for _, w in new] + ([replayed] if replayed is not None else [])))

    def aux_losses(self, model):
        """{'ewc': (λ, Σ_terms Σ F·(θ − θ*)²)} once an importance exists (with λ = 0 it is logged but adds nothing)."""
        return {'ewc': (self.ewc_lambda, sum(ewc_penalty(model, a, f) for a, f in self.terms))} if self.terms else {}

    def tracks_path(self):
        """Synaptic Intelligence integrates each step's contribution to the loss during every stage but the last."""
        return self.config['importance'] == 'si' and self.measures and self.stage + 1 < len(self.stages)

    @contextmanager
    def scaled_update(self, model):
        """Around the optimizer step. Importance-adaptive learning rates: each parameter's update (AdamW's step,
        weight decay included) is scaled element-wise, which is exactly a per-element learning rate; scaling
        the gradient instead would do nothing, since Adam divides it by its own RMS. Synaptic Intelligence:
        ω −= g·Δθ, the first-order decrease of the loss this step owes to each parameter (g: the clipped
        gradient of the whole loss, penalty included)."""
        si = self.tracks_path()
        if self.update_scale is None and not si:
            yield
            return
        params = dict(model.named_parameters())
        if si and self.si_omega is None:  # the stage's start: the path begins here
            self.si_start = {n: p.detach().clone() for n, p in params.items()}
            self.si_omega = {n: torch.zeros_like(p) for n, p in params.items()}
        names = params if si else self.update_scale
        before = {n: params[n].detach().clone() for n in names}
        yield
        with torch.no_grad():
            for n in names:
                p = params[n]
                if self.update_scale is not None and n in self.update_scale:
                    p.sub_(before[n]).mul_(self.update_scale[n]).add_(before[n])
                if si and p.grad is not None:
                    self.si_omega[n] -= p.grad * (p - before[n])

    def after_step(self, model, iter_num, ctx=None):
        """At the end of a stage: the R row, then (unless it was the last) the importance, anchor and the
        next stage. Returns the R row as text, or None mid-stage."""
        if iter_num not in self.ends:
            return None
        row = f"after stage {'+'.join(self.stages[self.stage])}"
        if self.eval_windows != 0:
            self.R.append([evaluate_loss(model, self.data(t, 'val'), self.block_size, max_windows=self.eval_windows,
                                         device=self.device, ctx=ctx) for t in self.tasks])
            row += ": val loss " + ", ".join(f"{t} {v:.4f}" for t, v in zip(self.tasks, self.R[-1]))
        if self.importance is not None:
            self.diagnostics.append(self.where_it_moved(model))
            d = self.diagnostics[-1]
            row += (f"; top 10% by importance: {d['importance']:.0%} of it, {d['movement']:.0%} of Σ(θ − θ*)², "
                    f"{d['penalty']:.0%} of Σ F·(θ − θ*)²")
        if self.stage + 1 < len(self.stages):
            if self.measures:
                self.consolidate(model)
            self.stage += 1
        return row

    def where_it_moved(self, model, top=0.1):
        """Why protection does or does not protect: the share held by the top `top` fraction of elements (by
        accumulated importance F) of F itself, of the movement Σ(θ − θ*)² since the latest anchor, and of the
        quadratic estimate of the earlier tasks' loss increase Σ F·(θ − θ*)²."""
        params, anchor = dict(model.named_parameters()), self.terms[-1][0]
        f = torch.cat([v.flatten() for v in self.importance.values()])
        d = torch.cat([(params[n].detach() - anchor[n]).pow(2).flatten() for n in self.importance])
        mask = torch.zeros_like(f, dtype=torch.bool)
        mask[f.topk(max(1, int(top * len(f))))[1]] = True
        share = lambda v: (v[mask].sum() / v.sum()).item() if v.sum() > 0 else 0.0
        return dict(stage=self.stage, importance=share(f), movement=share(d), penalty=share(f * d))

    def consolidate(self, model):
        """The importance of the stage just trained, folded into the running sum; an EWC term anchored at θ now.
        The Fisher and MAS are measured on fisher_batches of its training windows (a generator seeded by the
        stage, so a resumed run draws the same); SI's comes from the path integral over the stage."""
        if self.config['importance'] == 'si':
            new = self.si_importance(model)
        else:
            generator = torch.Generator().manual_seed(self.config['seed'] + 1000 + self.stage)
            batches = [self.xy(torch.cat([w for _, w in self.stage_windows('train', self.batch_size, generator)]))[0]
                       for _ in range(self.fisher_batches)]
            if self.config['importance'] == 'mas':
                new = estimate_mas(model, batches)
            else:
                sample_generator = torch.Generator(device=self.device).manual_seed(self.config['seed'] + 2000 + self.stage)
                new = estimate_fisher(model, batches, sample_generator)
        self.importance = new if self.importance is None else {n: self.ewc_gamma * self.importance[n] + new[n] for n in new}
        anchor = {n: p.detach().clone() for n, p in model.named_parameters() if n in new}
        self.terms = self.terms + [(anchor, new)] if self.config['ewc_mode'] == 'per_task' else [(anchor, self.importance)]
        self.update_scale = self._update_scale()

    def si_importance(self, model, xi=1e-3):
        """Synaptic Intelligence (Zenke 2017): Ω = max(ω, 0) / ((θ_end − θ_start)² + ξ), the loss decrease a
        parameter earned over the stage per squared distance it travelled; then a new path starts."""
        params = dict(model.named_parameters())
        if self.si_omega is None:  # a stage with no step
            return {n: torch.zeros_like(p) for n, p in params.items()}
        new = {n: self.si_omega[n].clamp(min=0) / ((params[n].detach() - self.si_start[n]) ** 2 + xi) for n in params}
        self.si_omega, self.si_start = None, None
        return new

    def _update_scale(self):
        """Per element: 1/(1 + s·F/mean(F)) (the mean over every element of every parameter), times protect_scale
        for the top protect_fraction of all elements by F; None when neither is on."""
        s, fraction = self.adaptive_lr_strength, self.config['protect_fraction']
        if not s and not fraction:
            return None
        f = torch.cat([v.flatten() for v in self.importance.values()])
        scale = 1 / (1 + s * f / f.mean())
        if fraction:
            scale[f.topk(int(fraction * len(f) + 0.5))[1]] *= self.config['protect_scale']
        sizes = [v.numel() for v in self.importance.values()]
        return {n: part.view_as(v) for (n, v), part in zip(self.importance.items(), scale.split(sizes))}

    def learned(self):
        """The stage at which each task (R column) is first trained."""
        return [next(i for i, s in enumerate(self.stages) if t in s) for t in self.tasks]

    def report(self):
        if not self.R:
            return "no R matrix: final_eval_windows=0 skips the per-stage val losses"
        return format_report(self.tasks, self.stages, self.R, self.learned())

    def state_dict(self):
        """Plain tensors, dicts, lists and numbers: loads with torch.load(weights_only=True)."""
        return dict(incremental_tasks=self.config['incremental_tasks'], iters_per_task=self.iters_per_task,
                    first_stage_iters=self.config['first_stage_iters'],
                    stage=self.stage, R=self.R, diagnostics=self.diagnostics, importance=self.importance,
                    terms=[list(t) for t in self.terms], si_omega=self.si_omega, si_start=self.si_start,
                    buffer=self.buffer.state_dict() if self.buffer else None)

    def load_state_dict(self, state):
        if state is None:
            raise ValueError("the checkpoint has no incremental-learning state: it was not trained with incremental_tasks")
        for key in ('incremental_tasks', 'iters_per_task', 'first_stage_iters'):
            if state[key] != self.config[key]:
                raise ValueError(f"the checkpoint was trained with {key}={state[key]!r}, not {self.config[key]!r}: "
                                 "a resumed sequence must keep its tasks and steps")
        self.stage, self.R, self.diagnostics, self.importance = state['stage'], state['R'], state['diagnostics'], state['importance']
        self.terms = [tuple(t) for t in state['terms']]
        self.si_omega, self.si_start = state['si_omega'], state['si_start']
        if self.buffer and state['buffer']:
            self.buffer.load_state_dict(state['buffer'])
        self.update_scale = self._update_scale() if self.importance else None
