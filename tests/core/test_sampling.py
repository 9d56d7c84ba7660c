import random

from core.sampling import BatchSampler


def lengths(n=500, seed=0):
    rng = random.Random(seed)
    return [rng.randint(3, 120) for _ in range(n)]


def padding(sampler, lens, epoch=0):
    return sum(len(b) * max(lens[i] for i in b) - sum(lens[i] for i in b) for b in sampler.batches(epoch))


def test_every_example_once_per_epoch_and_reproducible():
    lens = lengths()
    sampler = BatchSampler(lens, batch_size=32, seed=7, group_by_length=True)
    batches = sampler.batches(1)
    assert sorted(i for b in batches for i in b) == list(range(500)) and len(batches) == len(sampler) == 16
    assert batches == BatchSampler(lens, batch_size=32, seed=7, group_by_length=True).batches(1)
    assert batches != sampler.batches(2)
    assert sampler.batches_from(1, 5) == batches[5:]


def test_grouping_cuts_padding_but_keeps_batch_order_random():
    lens = lengths()
    grouped = BatchSampler(lens, batch_size=16, seed=0, group_by_length=True)
    plain = BatchSampler(lens, batch_size=16, seed=0, group_by_length=False)
    assert padding(grouped, lens) < 0.3 * padding(plain, lens)
    longest = [max(lens[i] for i in b) for b in grouped.batches(0)[1:]]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
