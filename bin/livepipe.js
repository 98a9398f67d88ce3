#!/usr/bin/env node
// The `livepipe` command; the code is compiled from src/server/cli.ts (npm run build).
import { main } from '../dist/server/cli.js';

await main();
