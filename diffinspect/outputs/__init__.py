"""Where verdicts go besides results.db: the outbox worker, MQTT and OPC UA."""
