"""Tutorial 6, "Headers": a headers exchange routes by message headers, not routing keys.

A binding lists the headers to match and ``x-match``: ``all`` (every one must match) or
``any`` (at least one).
"""

from __future__ import annotations

import os

import wharf

URL = os.environ.get("WHARF_URL", wharf.DEFAULT_URL)
MESSAGES: list[tuple[str, wharf.Headers]] = [
    ("monthly pdf report", {"format": "pdf", "type": "report"}),
    ("pdf invoice", {"format": "pdf", "type": "invoice"}),
    ("zip log archive", {"format": "zip", "type": "log"}),
]


def main() -> None:
    """``pdf_reports`` wants format pdf AND type report; the other, type invoice OR format zip."""
    with wharf.connect(URL) as conn:
        conn.declare_exchange("documents", "headers")
        pdf_reports = conn.declare_queue("", exclusive=True).name
        conn.bind(pdf_reports, "documents", arguments={"x-match": "all", "format": "pdf", "type": "report"})
        invoices_or_logs = conn.declare_queue("", exclusive=True).name
        conn.bind(invoices_or_logs, "documents", arguments={"x-match": "any", "type": "invoice", "format": "zip"})

        for body, headers in MESSAGES:
            conn.publish("", body.encode(), exchange="documents", headers=headers)
            print(f" [x] Sent {body!r} with {dict(headers)}")

        results: dict[str, list[str]] = {}
        for name, queue in (("pdf reports (all)", pdf_reports), ("invoices or zips (any)", invoices_or_logs)):
            results[name] = [message.body.decode() for message in conn.consume(queue, auto_ack=True, timeout=0.5)]
            print(f" [{name}] Received {results[name]}")
        assert results["pdf reports (all)"] == ["monthly pdf report"]
        assert results["invoices or zips (any)"] == ["pdf invoice", "zip log archive"]


if __name__ == "__main__":
    main()
