"""Device sessions at the MQTT broker, device credentials, and the MQTT-Kafka bridge."""
