"""The live Faust/Kafka shell around the pure core."""
