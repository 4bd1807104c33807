"""The pure KPI core: parsing, time buckets, member state, aggregates and the Processor.

Nothing under this package imports Faust, Kafka or Redis (tests/unit/test_layout.py keeps it so);
the live worker, replay and the tests all drive the same :class:`Processor`.
"""

from .processor import (
    APPLIED,
    DUPLICATE,
    PartitionStore,
    Processor,
    Signal,
    evaluate_kpis,
    member_status,
    seen_key,
)

__all__ = ["Processor", "PartitionStore", "Signal", "seen_key", "evaluate_kpis", "member_status",
           "APPLIED", "DUPLICATE"]
