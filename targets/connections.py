"""How the suite reaches a device, as data: each connection a target's `connection` key may name.

A connection says where models run (the bench place: this process, a board over TVM RPC, or
firmware under qemu-system), where its power sensor is read, and which runner measures tuning
candidates. Code asks these questions of the connection instead of comparing its name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Connection:
    name: str
    place: str  # where models run: "host" (this process), "board" (TVM RPC), "mcu" (C firmware under qemu)
    power_read_here: bool  # the power sensor is on this machine (else on the board, reached over SSH)
    tuning_runner: str  # "local": candidates run in this machine's workers; "rpc": on the board


CONNECTIONS = {
    connection.name: connection
    for connection in (
        Connection("local", place="host", power_read_here=True, tuning_runner="local"),
        Connection("rpc", place="board", power_read_here=False, tuning_runner="rpc"),
        Connection("qemu-system", place="mcu", power_read_here=True, tuning_runner="local"),
    )
}
