"""The largest gRPC message the federation sends or accepts, and the channel options saying so.

Bundle chunks (256 KiB by default) and adapters are far below the cap; the cap bounds what a
hostile peer can make a server buffer. The coordinator's ``--max-message-mib`` may raise its own
cap; nodes keep this one.

Dependency rule: this module imports nothing else of ours.
"""

from __future__ import annotations

MIB = 1024 * 1024
MAX_MESSAGE_BYTES = 8 * MIB


def message_size_options(max_bytes: int = MAX_MESSAGE_BYTES, *, send: bool = True,
                         receive: bool = True) -> list[tuple[str, int]]:
    """gRPC server or channel options capping received and/or sent messages at ``max_bytes``.

    A message over the cap fails with RESOURCE_EXHAUSTED.
    """
    options = []
    if receive:
        options.append(("grpc.max_receive_message_length", max_bytes))
    if send:
        options.append(("grpc.max_send_message_length", max_bytes))
    return options
