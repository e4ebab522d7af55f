"""Values a client might send in any request field: every JSON type, ints past 64 bits, floats past
every field's range, empty and odd strings, empty and nested containers. The transports' tests send
each in each field of an otherwise good request and want an answer or a clear error, never a
failure of the server."""

ODD_VALUES = [None, True, False, 0, -1, 1, 2, 2**31, 2**63, 2**64, -2**63, 10**30, 0.5, -0.5, 1e308,
              -1e308, 1e-300, "", "x", "\u0000", "a" * 2000, [], [1], [[1]], [[]], [""], [None], [-1],
              [1.5], ["a", 1], {}, {"a": 1}, {"5": 1}, {"type": "text"}, [{"role": "user"}],
              [{"role": "user", "content": 1}]]
