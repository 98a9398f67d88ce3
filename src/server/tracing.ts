import type { RelayTracer } from '../tracer.ts';
import type { ServerConfig } from './args.ts';

/**
 * OpenTelemetry traces for the server, exported over OTLP/HTTP (JSON) when `tracing` is
 * configured. The SDK packages are optional peer dependencies, loaded only then, so a server
 * without tracing never loads them. The usual OTEL_* variables (OTEL_EXPORTER_OTLP_HEADERS,
 * OTEL_TRACES_SAMPLER, OTEL_BSP_*, …) apply as well.
 */

export type TracingConfig = NonNullable<ServerConfig['tracing']>;

export interface Tracing {
  tracer: RelayTracer;
  /** Exports the spans still buffered, then stops. */
  shutdown(): Promise<void>;
}

export const TRACING_PACKAGES = [
  '@opentelemetry/api',
  '@opentelemetry/sdk-trace-base',
  '@opentelemetry/exporter-trace-otlp-http',
  '@opentelemetry/resources',
] as const;

export class TracingUnavailable extends Error {
  override readonly name = 'TracingUnavailable';
}

/**
 * Starts a tracer provider that batches spans to the collector at `config.endpoint`. The SDK's
 * own warnings and errors (a collector that cannot be reached, say) go to `problem`; the SDK
 * would otherwise drop them silently.
 */
export async function startTracing(config: TracingConfig, serviceVersion: string, problem: (message: string) => void = () => {}): Promise<Tracing> {
  const [api, sdk, otlp, resources] = await Promise.all([
    load<typeof import('@opentelemetry/api')>(TRACING_PACKAGES[0]),
    load<typeof import('@opentelemetry/sdk-trace-base')>(TRACING_PACKAGES[1]),
    load<typeof import('@opentelemetry/exporter-trace-otlp-http')>(TRACING_PACKAGES[2]),
    load<typeof import('@opentelemetry/resources')>(TRACING_PACKAGES[3]),
  ]);
  const report = (message: string, ...args: unknown[]) => problem([message, ...args.map(String)].join(' '));
  const quiet = () => {};
  api.diag.setLogger({ error: report, warn: report, info: quiet, debug: quiet, verbose: quiet }, api.DiagLogLevel.WARN);
  const provider = new sdk.BasicTracerProvider({
    resource: resources.resourceFromAttributes({ 'service.name': config.serviceName ?? 'livepipe', 'service.version': serviceVersion }),
    spanProcessors: [new sdk.BatchSpanProcessor(new otlp.OTLPTraceExporter({ url: tracesUrl(config.endpoint) }))],
  });
  return { tracer: provider.getTracer('livepipe', serviceVersion), shutdown: () => provider.shutdown() };
}

/**
 * The traces URL for an endpoint given like OTEL_EXPORTER_OTLP_ENDPOINT (`http://collector:4318`,
 * to which `/v1/traces` is added) or already ending in `/v1/traces`.
 */
export function tracesUrl(endpoint: string): string {
  const url = new URL(endpoint);
  if (!url.pathname.endsWith('/v1/traces')) url.pathname = `${url.pathname.replace(/\/+$/, '')}/v1/traces`;
  return url.href;
}

async function load<T>(pkg: string): Promise<T> {
  try {
    return (await import(pkg)) as T;
  } catch (err) {
    if ((err as { code?: string }).code === 'ERR_MODULE_NOT_FOUND' && String((err as Error).message).includes(pkg)) {
      throw new TracingUnavailable(`tracing needs the npm packages ${TRACING_PACKAGES.join(', ')}; install them with: npm install ${TRACING_PACKAGES.join(' ')}`, { cause: err });
    }
    throw err;
  }
}
