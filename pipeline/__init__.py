"""The streaming side: the local Kafka broker, producers, and the Spark job that fills the lake."""
