// Drives Bemi's Prisma client against DATABASE_URL; each write's expected context is checked by the test.
const { PrismaClient } = require('@prisma/client');
const { PrismaPg, withBemiExtension, bemiMiddleware, setBemiContext } = require('@bemi-db/prisma');

const prisma = withBemiExtension(new PrismaClient({ adapter: new PrismaPg({ connectionString: process.env.DATABASE_URL }) }));

function inRequest(url, body) {
  return new Promise((resolve, reject) => {
    bemiMiddleware((req) => ({ endpoint: req.url, userId: 7 }))({ url }, {}, () => body().then(resolve, reject));
  });
}

async function main() {
  await inRequest('/todos', async () => {
    await prisma.todo.create({ data: { id: 1, task: 'a' } });
    await prisma.todo.createMany({ data: [{ id: 2, task: 'b' }, { id: 3, task: 'c' }] });
    await prisma.todo.update({ where: { id: 1 }, data: { done: true } });
    await prisma.todo.delete({ where: { id: 3 } });
  });
  await inRequest('/upsert', async () => {
    setBemiContext({ job: 'upsert' });
    await prisma.todo.upsert({ where: { id: 4 }, create: { id: 4, task: 'd' }, update: { task: 'd2' } });
    await prisma.todo.upsert({ where: { id: 4 }, create: { id: 4, task: 'd' }, update: { task: 'd2' } });
  });
  await inRequest('/raw', async () => {
    await prisma.$executeRaw`UPDATE todo SET task = ${'raw'} WHERE id = 2`;
  });
  await prisma.$disconnect();
}

main().catch((e) => { console.error(e); process.exit(1); });
