"""Pure unit tests of the stream stage logic (no Kafka, no Faust)."""
