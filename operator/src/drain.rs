//! Draining a broker group before scale-in, through the broker crate's admin client (the same
//! protocol code mqadmin uses): wipe its write permission, then wait until every consumer
//! group has consumed every queue it holds.

use futures::future::BoxFuture;

use broker::client::Client;

use crate::controller::{DrainProbe, GroupRef};

/// The real drain, talking to the cluster's name servers and brokers.
#[derive(Default)]
pub struct BrokerDrain;

async fn master_of(client: &Client, g: &GroupRef) -> Result<String, String> {
    let info = client.cluster_info().await.map_err(|e| e.to_string())?;
    info.broker_addr_table
        .get(&g.group)
        .and_then(|b| b.master_addr().map(String::from))
        .ok_or_else(|| format!("{} has no master registered with the name servers", g.group))
}

impl DrainProbe for BrokerDrain {
    fn make_read_only<'a>(&'a self, g: &'a GroupRef) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let client = Client::new(broker::config::split_namesrv(&g.namesrv_addr));
            let master = master_of(&client, g).await?;
            client
                .wipe_write_perm(&g.group, &master)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn drained<'a>(&'a self, g: &'a GroupRef) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let client = Client::new(broker::config::split_namesrv(&g.namesrv_addr));
            let master = master_of(&client, g).await?;
            let offsets = client
                .consumer_offsets(&master)
                .await
                .map_err(|e| e.to_string())?;
            for ((topic, group), queues) in offsets {
                for (queue, committed) in queues {
                    let max = client
                        .max_offset(&master, &topic, queue)
                        .await
                        .map_err(|e| e.to_string())?;
                    if committed < max {
                        tracing::info!(broker_group = %g.group, %topic, consumer_group = %group, queue, committed, max, "still draining");
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        })
    }
}
