"""The local Kafka broker (or cluster) from Maven jars, the producer, and the synthetic fleet."""
