"""Fleet side of telemetry: validate what devices publish, store it once, notice every gap.

payloads.py    untrusted bytes -> frozen value objects (or InvalidPayload with a stable reason)
gaps.py        pure sequence arithmetic: which seq ranges are missing, open or lost
schema.py      the tables as they are now; migrations.py builds them, version by version
store.py       TelemetryStore: one data layer over SQLite (default) or PostgreSQL
ingest.py      IngestWorker: an MQTT 5 shared-subscription consumer that acks after commit

Data flows one way: ingest -> payloads -> store -> (schema, gaps). The contract is
docs/protocol.md, sections "Telemetry", "Status document and last will" and "Update events".
"""
