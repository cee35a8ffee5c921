// Publishes each line of stdin (one JSON message) to a topic, keyed by the tenant.
// Usage: node produce.mjs BOOTSTRAP TOPIC KEY < records.jsonl
import { Kafka, logLevel } from "kafkajs";
import { createInterface } from "node:readline";

const [bootstrap, topic, key] = process.argv.slice(2);
if (!bootstrap || !topic || !key) {
  console.error("usage: node produce.mjs BOOTSTRAP TOPIC KEY < records.jsonl");
  process.exit(2);
}
const lines = [];
for await (const line of createInterface({ input: process.stdin })) {
  if (line.trim()) lines.push(line);
}
const kafka = new Kafka({ clientId: "kllm-node", brokers: [bootstrap], logLevel: logLevel.ERROR });
const producer = kafka.producer();
await producer.connect();
await producer.send({ topic, acks: -1, messages: lines.map((value) => ({ key, value })) });
await producer.disconnect();
console.log(`published ${lines.length} record(s) to ${topic}`);
