"""The TCP send buffer behaves exactly like the ``bytearray`` it replaces."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from netstack.sendbuf import COALESCE, LARGE, SendBuffer

sizes = st.one_of(st.integers(0, 64), st.integers(LARGE - 2, LARGE + 2), st.integers(0, 70_000))
operation = st.one_of(
    st.tuples(st.just("append"), sizes, st.sampled_from(["bytes", "bytearray", "memoryview"])),
    st.tuples(st.just("consume"), st.integers(-1, 80_000), st.just("")),
    st.tuples(st.just("peek"), st.integers(-1, 150_000), st.integers(-1, 70_000)),
    st.tuples(st.just("clear"), st.just(0), st.just("")),
)


@settings(max_examples=300)
@given(st.lists(operation, max_size=60))
def test_matches_a_bytearray(operations: list[tuple[str, int, object]]) -> None:
    buffer = SendBuffer()
    model = bytearray()
    counter = 0
    for name, number, extra in operations:
        if name == "append":
            data = bytes((counter + i) & 0xFF for i in range(number))
            counter += number
            buffer.append(
                data
                if extra == "bytes"
                else bytearray(data)
                if extra == "bytearray"
                else memoryview(data)
            )
            model += data
        elif name == "consume":
            buffer.consume(number)
            if number > 0:
                del model[:number]
        elif name == "peek":
            count = extra
            assert isinstance(count, int)
            expected = bytes(model[number : number + count]) if number >= 0 and count > 0 else b""
            got = buffer.peek(number, count)
            assert type(got) is bytes
            assert got == expected
        else:
            buffer.clear()
            model.clear()
        assert len(buffer) == len(model)
        assert bool(buffer) == bool(model)
    assert buffer.peek(0, len(model) + 1) == bytes(model)


def test_appended_buffers_are_copied() -> None:
    buffer = SendBuffer()
    data = bytearray(b"x" * (LARGE + 1))
    small = bytearray(b"abc")
    buffer.append(data)
    buffer.append(small)
    data[0] = ord("y")
    small[0] = ord("z")
    assert buffer.peek(0, 1) == b"x"
    assert buffer.peek(LARGE + 1, 3) == b"abc"


def test_tiny_writes_are_coalesced_and_memory_is_released() -> None:
    buffer = SendBuffer()
    for _ in range(3 * COALESCE // 10):
        buffer.append(b"0123456789")
    assert len(buffer._chunks) <= 3  # gathered, not 19,660 chunks of 10 bytes
    buffer.consume(2 * COALESCE)
    assert sum(len(chunk) for chunk in buffer._chunks) <= COALESCE + 10
    for _ in range(200):  # many whole chunks consumed: the slot lists are compacted
        buffer.append(bytes(LARGE))
        buffer.consume(LARGE)
    assert len(buffer._chunks) - buffer._first <= 20  # live chunks
    assert len(buffer._chunks) < 100  # consumed slots are dropped in bulk
