"""The streaming job: Spark session, Kafka source, parser, dedupe, KPIs, and its exactly-once Delta writes."""
