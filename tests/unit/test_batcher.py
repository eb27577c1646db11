from processor.batcher import Batch, MicroBatcher
from processor.source import BatchItem, SourceRecord
from processor.engines.base import Prompt
from processor.events import validate_event
from tests.helpers import make_event


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def item(offset: int, tokens: int = 10, partition: int = 0, error: Exception | None = None) -> BatchItem:
    source = SourceRecord("in", partition, offset, b"k", b"v", None)
    if error is not None:
        return BatchItem(source, error=error)
    event = validate_event(make_event(offset))
    return BatchItem(source, prompt=Prompt(event, (), tuple(range(tokens)), "en", 1, 0))


def test_closes_at_max_records():
    batcher = MicroBatcher(3, 10.0, 10_000, FakeClock())
    assert batcher.add(item(0)) == [] and batcher.add(item(1)) == []
    closed = batcher.add(item(2))
    assert len(closed) == 1 and [i.source.offset for i in closed[0].items] == [0, 1, 2]
    assert batcher.pending == 0


def test_closes_after_max_wait_from_the_first_record():
    clock = FakeClock()
    batcher = MicroBatcher(100, 2.0, 10_000, clock)
    batcher.add(item(0))
    clock.now += 1.5
    batcher.add(item(1))
    assert batcher.due() is None
    assert abs(batcher.seconds_until_due() - 0.5) < 1e-9
    clock.now += 0.5
    batch = batcher.due()
    assert batch is not None and len(batch) == 2


def test_closes_when_the_next_record_would_pass_the_token_budget():
    batcher = MicroBatcher(100, 10.0, 100, FakeClock())
    assert batcher.add(item(0, tokens=60)) == []
    closed = batcher.add(item(1, tokens=50))  # 110 > 100: the open batch closes, this one starts the next
    assert [[i.source.offset for i in b.items] for b in closed] == [[0]]
    assert batcher.pending == 1


def test_a_single_oversized_prompt_still_forms_a_batch():
    batcher = MicroBatcher(100, 10.0, 100, FakeClock())
    assert batcher.add(item(0, tokens=500)) == []
    assert batcher.pending == 1


def test_failed_records_ride_along_and_count_towards_no_limit():
    batcher = MicroBatcher(2, 10.0, 100, FakeClock())
    batcher.add(item(0))
    batcher.add(item(1, error=ValueError("bad")))
    closed = batcher.add(item(2))
    assert len(closed) == 1
    batch = closed[0]
    assert batch.events == 2 and len(batch) == 3 and len(batch.prompts) == 2


def test_next_offsets_per_partition():
    batch = Batch()
    for offset, partition in [(5, 0), (6, 0), (3, 1), (9, 0)]:
        batch.add(item(offset, partition=partition))
    assert batch.next_offsets() == {("in", 0): 10, ("in", 1): 4}


def test_drop_forgets_revoked_partitions():
    batcher = MicroBatcher(10, 10.0, 10_000, FakeClock())
    batcher.add(item(0, partition=0))
    batcher.add(item(0, partition=1))
    assert batcher.drop(lambda s: s.partition != 1) == 1
    assert batcher.pending == 1
    assert batcher.drop(lambda s: False) == 1 and batcher.pending == 0
