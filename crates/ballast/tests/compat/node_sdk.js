// Sends one event of each type through a vendor's Node SDK, unchanged, to a data plane.
//
// usage: node node_sdk.js rudderstack|segment DATA_PLANE_URL WRITE_KEY PREFIX
// Prints the messageIds it sent, one JSON list on stdout; exits 1 if the SDK reported an
// error. Used by crates/ballast/tests/sdk_compat.rs.
const [sdk, url, writeKey, prefix] = process.argv.slice(2);
const sent = [];
const errors = [];
const mid = (kind) => {
  const m = `${prefix}-${kind}`;
  sent.push(m);
  return m;
};

async function main() {
  let client;
  let close;
  if (sdk === 'rudderstack') {
    const Analytics = require('@rudderstack/rudder-sdk-node');
    client = new Analytics(writeKey, {
      dataPlaneUrl: url,
      flushAt: 100,
      flushInterval: 100,
      logLevel: 'error',
      errorHandler: (e) => errors.push(String(e)),
    });
    close = () => new Promise((resolve) => client.flush((err) => {
      if (err) errors.push(String(err));
      resolve();
    }));
  } else if (sdk === 'segment') {
    const { Analytics } = require('@segment/analytics-node');
    client = new Analytics({ writeKey, host: url, flushInterval: 100, maxRetries: 3 });
    client.on('error', (e) => errors.push(JSON.stringify(e)));
    close = () => client.closeAndFlush({ timeout: 20000 });
  } else {
    throw new Error(`unknown sdk ${sdk}`);
  }
  client.identify({ userId: 'js-user', traits: { plan: 'pro' }, messageId: mid('identify') });
  client.track({ userId: 'js-user', event: 'Song Played', properties: { n: 1 }, messageId: mid('track') });
  client.page({ userId: 'js-user', category: 'Docs', name: 'Home', properties: { path: '/' }, messageId: mid('page') });
  client.screen({ userId: 'js-user', name: 'Settings', properties: { tab: 2 }, messageId: mid('screen') });
  client.group({ userId: 'js-user', groupId: 'g-1', traits: { size: 3 }, messageId: mid('group') });
  client.alias({ previousId: 'js-anon', userId: 'js-user', messageId: mid('alias') });
  client.track({ anonymousId: 'js-anon-2', event: 'Anonymous', properties: {}, messageId: mid('anon') });
  await close();
  console.log(JSON.stringify(sent));
  if (errors.length) {
    console.error(errors.join('\n'));
    process.exit(1);
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
