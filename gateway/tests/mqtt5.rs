//! The optional MQTT 5 listener: a real MQTT 5 client publishes to `broker.listen_v5`, and the
//! event reaches a real upstream broker (a second rumqttd) through the gateway.

use std::time::Duration;

use outpost::config::{GatewayConfig, UpstreamConfig, UpstreamUrl};
use outpost_sim::harness::free_addr;
use outpost_sim::verify::start_subscriber;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_sensor_reaches_the_upstream() {
    let upstream = free_addr().expect("a free port");
    outpost_sim::broker::spawn_broker(upstream, None).expect("upstream rumqttd");
    let mut subscriber = start_subscriber(&upstream.to_string(), "#").await.expect("upstream subscriber");

    let data = tempfile::tempdir().expect("tempdir");
    let mut config = GatewayConfig { data_dir: data.path().to_owned(), ..Default::default() };
    config.broker.listen = free_addr().expect("a free port");
    let v5 = free_addr().expect("a free port");
    config.broker.listen_v5 = Some(v5);
    config.upstream = Some(UpstreamConfig::with_url(UpstreamUrl::plain("127.0.0.1", upstream.port())));
    let gateway = outpost::Gateway::start(config).await.expect("gateway starts");

    let mut opts = MqttOptions::new("sensor-v5", "127.0.0.1", v5.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    client.publish("sensors/v5/temp", QoS::AtLeastOnce, false, b"{\"t\":21}".to_vec()).await.expect("queue");
    loop {
        match eventloop.poll().await.expect("MQTT 5 connection") {
            Event::Incoming(Packet::PubAck(_)) => break,
            _ => continue,
        }
    }
    subscriber.wait_for_count(1, Duration::from_secs(20)).await.expect("the event arrives upstream");
    assert_eq!(subscriber.messages(), vec![("sensors/v5/temp".to_owned(), b"{\"t\":21}".to_vec())]);
    assert!(gateway.shutdown().await);
}
